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

// One node of a built tree. Level 0 holds the leaves sorted by key (= uint32 nonce).
struct Node {
    uint8_t hash[32];
    uint32_t key;     // node position at its level: nonce >> level
    uint32_t count;   // leaves below
    uint32_t parent;  // index of the parent in the next level
};

// An immutable tree over a fixed set of leaves (the full tree or a snapshot).
struct Tree {
    int depth = kDefaultDepth;
    uint64_t count = 0;
    std::vector<std::vector<Node>> levels;  // levels[0] = leaves (sorted), levels[depth] = {root}; empty if count 0
    std::vector<uint32_t> arrival;          // arrival index of levels[0][i]

    Hash root() const;
    // Writes depth * 36 bytes, root -> leaf. dense_index must be < count.
    void proof(uint64_t dense_index, uint8_t* out) const;
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

// The growing tree: leaves in arrival order plus a lazily (and incrementally) rebuilt full tree and
// a small cache of snapshot trees. Thread-safe: every public method takes the object's mutex.
class Smst {
   public:
    Smst();

    // Throws std::invalid_argument on an empty vector or a duplicate nonce; the tree is unchanged then.
    void insert(uint32_t nonce, const uint8_t* vector, size_t len);
    // All-or-nothing: vectors[i] has lens[i] bytes. Duplicates (against the tree or inside the batch)
    // and empty vectors are rejected before anything changes.
    void extend(size_t n, const uint32_t* nonces, const uint8_t* const* vectors, const size_t* lens);
    // Same for n fixed-length vectors stored contiguously ([n, len] bytes).
    void extend_fixed(size_t n, const uint32_t* nonces, const uint8_t* vectors, size_t len);

    uint64_t count() const;
    int depth() const;
    bool contains(uint32_t nonce) const;

    // count == 0 means the current tree. Throws SnapshotNotFound for counts outside [1, count()].
    Hash root_at(uint64_t count);
    int depth_at(uint64_t count);
    // Proof bytes (depth * 36). Throws std::out_of_range if dense_index >= the snapshot's count.
    std::string proof(uint64_t dense_index, uint64_t count);
    // Many proofs into out (n * depth * 36 bytes, depth = depth_at(count)); all indices checked first.
    void proofs(size_t n, const uint64_t* dense_indices, uint64_t count, uint8_t* out);
    // (nonce, vector) of the leaf at dense_index of the snapshot.
    std::pair<uint32_t, std::string> artifact(uint64_t dense_index, uint64_t count);
    // Leaf in arrival order (0-based).
    std::pair<uint32_t, std::string> arrival_leaf(uint64_t arrival_index) const;

   private:
    struct NonceSet {
        std::vector<uint64_t> slots;  // nonce + 1, 0 = free
        size_t used = 0;
        bool insert(uint32_t nonce);  // false if present
        bool contains(uint32_t nonce) const;
        void reserve(size_t n);
        void clear();
    };

    void check_vectors(size_t n, const size_t* lens) const;
    void append_unlocked(uint32_t nonce, const uint8_t* vector, size_t len);
    void rollback_set();
    std::shared_ptr<const Tree> full_tree_unlocked();
    std::shared_ptr<const Tree> tree_at_unlocked(uint64_t count);

    mutable std::mutex mu_;
    std::vector<uint32_t> nonces_;
    std::vector<uint8_t> data_;
    std::vector<uint64_t> offsets_;  // size count + 1
    std::vector<uint8_t> leaf_hashes_;  // 32 per hashed leaf
    NonceSet set_;
    uint32_t max_nonce_ = 0;
    std::shared_ptr<const Tree> full_;
    std::map<uint64_t, std::shared_ptr<const Tree>> snapshots_;  // small cache, evicts the oldest inserted
    std::vector<uint64_t> snapshot_order_;
};

}  // namespace cpoc::smst
