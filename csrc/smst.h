// Sparse Merkle Sum Tree keyed by nonce, as in Gonka chain v0.2.14 (spec pocv2_protocol.md §1.3).
//
// Bytes (all exact): leaf = SHA256(0x00 || LE32(uint32 nonce) || vector); node = SHA256(0x01 || left ||
// right || LE32(count)); E[0] = SHA256(0x00), E[h] = node(E[h-1], E[h-1], 0). Depth D = max(24,
// bitlen(max uint32 nonce)) <= 32, path MSB-first (1 = right). Dense index = rank by uint32 nonce.
// Proofs: D elements root -> leaf, each sibling_hash(32) || LE32(sibling_count).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <stdexcept>
#include <string>
#include <vector>

namespace cpoc::smst {

constexpr int kDefaultDepth = 24;
constexpr int kMaxDepth = 32;
constexpr size_t kProofElementSize = 36;

using Hash = std::array<uint8_t, 32>;

// E[h] for h = 0..32.
const Hash& empty_hash(int height);
// max(24, bitlen(max_nonce)) with bitlen(0) = 1.
int depth_for(uint32_t max_nonce);

// A snapshot count that the tree does not have (0, or more than the leaves inserted).
struct SnapshotNotFound : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Number of threads the bulk paths (tree build, proofs) may use; default min(hardware threads, 8).
// Results never depend on it (independent hashes, written to fixed places).
void set_max_threads(int n);
int max_threads();

// One node of the compressed (Patricia) form of the tree. A leaf (level 0) or a branching node at
// `level` whose two children both hold leaves. The levels between a node and its parent are unary
// (the other side empty); `hash` is the node's hash carried up through them to level `top` = the
// parent's level - 1 (the root: top = depth), i.e. exactly the value the full binary tree has there.
struct PNode {
    uint8_t hash[32];   // hash at level `top` (valid unless dirty)
    uint32_t key;       // leaf nonce >> level
    uint32_t count;     // leaves below
    uint32_t child[2];  // branching: child ids (bit level-1 of the key = 0 / 1); leaf: child[0] = arrival index
    uint32_t min_arr;   // smallest / largest arrival index below (snapshots: a subtree is untouched
    uint32_t max_arr;   // at count c when max_arr < c, absent when min_arr >= c)
    uint8_t level;
    uint8_t top;
    uint8_t dirty;
    uint8_t pad;
};

// Nodes in fixed-size blocks: ids and references stay valid while the tree grows, and growing never
// copies the nodes already there (a flush at millions of leaves costs what it adds, not a realloc).
class NodeArena {
   public:
    static constexpr int kShift = 16;
    PNode& operator[](uint32_t id) { return blocks_[id >> kShift][id & kMask]; }
    const PNode& operator[](uint32_t id) const { return blocks_[id >> kShift][id & kMask]; }
    size_t size() const { return size_; }
    uint32_t push_back(const PNode& n) {
        if (size_ == blocks_.size() << kShift) blocks_.emplace_back(new PNode[size_t(1) << kShift]);
        const uint32_t id = uint32_t(size_++);
        (*this)[id] = n;
        return id;
    }
    void resize(size_t n) {  // new nodes are left uninitialised
        while ((blocks_.size() << kShift) < n) blocks_.emplace_back(new PNode[size_t(1) << kShift]);
        size_ = n;
    }
    void clear() {
        blocks_.clear();
        size_ = 0;
    }
    size_t bytes() const { return (blocks_.size() << kShift) * sizeof(PNode); }

   private:
    static constexpr uint32_t kMask = (1u << kShift) - 1;
    std::vector<std::unique_ptr<PNode[]>> blocks_;
    size_t size_ = 0;
};

// Verification outcome codes (0 = valid); see verify_reason().
enum VerifyCode : int {
    kValid = 0,
    kEmptyProof,
    kProofTooLong,
    kZeroCount,
    kIndexOutOfRange,
    kBadElementSize,
    kCountOverflow,
    kCountMismatch,
    kRootMismatch,
    kIndexMismatch,
};
const char* verify_reason(int code);

// VerifySMSTProofWithDenseIndex: proof = n_elements contiguous elements whose sizes are given in
// element_sizes (nullptr means all 36). Depth = n_elements. The nonce picks the path only.
int verify(const uint8_t root[32], uint64_t count, uint64_t dense_index, uint32_t nonce, const uint8_t* leaf_data,
           size_t leaf_len, const uint8_t* proof, size_t n_elements, const size_t* element_sizes = nullptr);

// n proofs against one (root, count): leaf_data [n, leaf_len], proofs [n, depth, 36]. Writes codes[n].
void verify_many(const uint8_t root[32], uint64_t count, size_t n, const uint64_t* dense_indices,
                 const uint32_t* nonces, const uint8_t* leaf_data, size_t leaf_len, const uint8_t* proofs,
                 size_t depth, int* codes);

// The growing tree: leaves in arrival order plus one compressed tree over all of them, updated
// incrementally (new leaves are inserted, only their paths rehashed) or rebuilt in bulk (sorted
// leaves, level by level, several hashes at once, on several threads). A snapshot (the tree of the
// first c arrivals) is read from the same tree: subtrees untouched since c keep their hashes, the
// others are recomputed on demand (per count, cached until the next insert).
// Thread-safe: every public method takes the object's mutex.
class Smst {
   public:
    Smst();

    // Throws std::invalid_argument on an empty vector or a duplicate nonce; the tree is unchanged then.
    void insert(uint32_t nonce, const uint8_t* vector, size_t len);
    // All-or-nothing: vectors[i] has lens[i] bytes. Duplicates (against the tree or inside the batch)
    // and empty vectors are rejected before anything changes. The caller's buffers must not change
    // during the call (the bindings pass private copies).
    void extend(size_t n, const uint32_t* nonces, const uint8_t* const* vectors, const size_t* lens);
    // Same for n fixed-length vectors stored contiguously ([n, len] bytes).
    void extend_fixed(size_t n, const uint32_t* nonces, const uint8_t* vectors, size_t len);

    uint64_t count() const;
    int depth() const;
    bool contains(uint32_t nonce) const;

    // count == 0 means the current tree. Throws SnapshotNotFound for counts outside [1, count()].
    Hash root_at(uint64_t count);
    int depth_at(uint64_t count);
    // Roots at many counts (each in 1..count()). Counts at or past the leaves already in the tree
    // are reached by growing the tree through them in order (a replayed log checks every committed
    // root for about the cost of one build); earlier ones are read as snapshots.
    std::vector<Hash> roots_at(const std::vector<uint64_t>& counts);
    // Proof bytes (depth * 36). Throws std::out_of_range if dense_index >= the snapshot's count.
    std::string proof(uint64_t dense_index, uint64_t count);
    // Many proofs into out (n * depth * 36 bytes, depth = depth_at(count)); all indices checked first.
    void proofs(size_t n, const uint64_t* dense_indices, uint64_t count, uint8_t* out);
    // (nonce, vector) of the leaf at dense_index of the snapshot.
    std::pair<uint32_t, std::string> artifact(uint64_t dense_index, uint64_t count);
    // Arrival indices of the leaves at dense_indices of the snapshot (all checked first).
    void arrivals(size_t n, const uint64_t* dense_indices, uint64_t count, uint32_t* out);
    // Leaf in arrival order (0-based).
    std::pair<uint32_t, std::string> arrival_leaf(uint64_t arrival_index) const;
    // Bytes held by the tree's arrays (leaves, nodes, nonce set, snapshot caches).
    size_t memory_bytes() const;

   private:
    struct NonceSet {
        std::vector<uint64_t> slots;  // nonce + 1, 0 = free
        size_t used = 0;
        bool insert(uint32_t nonce);  // false if present
        bool contains(uint32_t nonce) const;
        void reserve(size_t n);
        void clear();
    };
    struct HashCount {
        Hash hash;
        uint32_t count;
    };
    using Memo = std::unordered_map<uint32_t, HashCount>;

    void check_vectors(size_t n, const size_t* lens) const;
    void append_unlocked(uint32_t nonce, const uint8_t* vector, size_t len);
    void rollback_set();
    void leaf_hash_of(uint32_t arrival, uint8_t out[32]) const;

    // Brings the tree up to all leaves inserted so far (and the current depth).
    void sync_unlocked();
    void sync_to_unlocked(uint64_t n);  // the tree of the first n arrivals (n >= synced_)
    void rebuild_unlocked(uint64_t count, int depth);
    void insert_leaf_unlocked(uint32_t key, uint32_t arrival);
    void rehash_unlocked(uint32_t id);

    // The snapshot at count c (1..count()): its depth and the node whose subtree holds its leaves.
    void check_count(uint64_t c) const;
    int depth_of_snapshot(uint64_t c) const;
    uint32_t snapshot_start(int depth_c) const;
    Memo& memo_for(uint64_t c);
    // (hash at level `target`, leaf count) of node id's subtree restricted to arrivals < c.
    HashCount hash_at(uint32_t id, int target, uint64_t c, Memo& memo) const;
    // Follows dense index d of the snapshot down to its leaf; writes the proof when out != nullptr.
    uint32_t walk(uint64_t d, uint64_t c, int depth_c, Memo* memo, uint8_t* out) const;

    mutable std::mutex mu_;
    std::vector<uint32_t> nonces_;
    std::vector<uint8_t> data_;
    std::vector<uint64_t> offsets_;  // size count + 1
    NonceSet set_;
    uint32_t max_nonce_ = 0;

    NodeArena nodes_;
    uint32_t root_;
    uint64_t synced_ = 0;       // leaves (arrival prefix) in nodes_
    uint32_t synced_max_ = 0;   // their largest nonce
    std::map<uint64_t, Memo> memos_;  // per snapshot count; cleared when leaves are added
    std::vector<uint64_t> memo_order_;
};

}  // namespace cpoc::smst
