// SMST core (no Python here; bindings in merkle_bindings.cpp). See smst.h for the normative bytes.
#include "smst.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "sha256.h"

namespace cpoc::smst {
namespace {

constexpr uint32_t kNil = 0xFFFFFFFFu;
constexpr size_t kMemoCacheSize = 4;     // snapshot counts whose recomputed subtrees are kept
constexpr size_t kParallelMin = 16384;   // jobs below this run on the calling thread

std::atomic<int> g_max_threads{0};  // 0 = not set: min(hardware threads, 8)

std::array<Hash, kMaxDepth + 1> make_empty_hashes() {
    std::array<Hash, kMaxDepth + 1> e{};
    const uint8_t zero = 0x00;
    sha::sha256(&zero, 1, e[0].data());
    for (int h = 1; h <= kMaxDepth; ++h) sha::node_hash(e[h - 1].data(), e[h - 1].data(), 0, e[h].data());
    return e;
}

// key >> shift for shift 0..32 (a shift by 32 is 0, not undefined).
inline uint32_t shr(uint32_t key, int shift) { return shift >= 32 ? 0u : key >> shift; }
inline int bitlen(uint32_t x) { return x ? 32 - __builtin_clz(x) : 0; }

// Sorts (key << 32 | arrival) words by key (LSD radix on the key's 32 bits; keys are unique).
void sort_by_key(std::vector<uint64_t>& v) {
    if (v.size() < 512) {
        std::sort(v.begin(), v.end());
        return;
    }
    std::vector<uint64_t> tmp(v.size());
    const int shifts[3] = {32, 43, 54};
    const int widths[3] = {11, 11, 10};
    for (int pass = 0; pass < 3; ++pass) {
        const int sh = shifts[pass];
        const uint64_t mask = (uint64_t(1) << widths[pass]) - 1;
        std::vector<size_t> cnt((size_t(1) << widths[pass]) + 1, 0);
        for (uint64_t x : v) ++cnt[((x >> sh) & mask) + 1];
        for (size_t i = 1; i < cnt.size(); ++i) cnt[i] += cnt[i - 1];
        for (uint64_t x : v) tmp[cnt[(x >> sh) & mask]++] = x;
        v.swap(tmp);
    }
}

// Runs f(begin, end) over [0, n) in small chunks that the calling thread and up to max_threads() - 1
// helpers take in turn (a helper that the OS does not schedule leaves its share to the others).
template <class F>
void parallel_chunks(size_t n, F f) {
    const int threads = max_threads();
    if (threads <= 1 || n < kParallelMin) {
        f(size_t(0), n);
        return;
    }
    const size_t grain = std::max<size_t>(kParallelMin / 8, n / (size_t(threads) * 16));
    std::atomic<size_t> next{0};
    auto work = [&]() {
        for (;;) {
            const size_t b = next.fetch_add(grain);
            if (b >= n) return;
            f(b, std::min(n, b + grain));
        }
    };
    std::vector<std::thread> pool;
    const size_t helpers = std::min<size_t>(size_t(threads) - 1, n / grain);
    pool.reserve(helpers);
    for (size_t k = 0; k < helpers; ++k) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
}

// Carries h (the hash of a node with `key` at level `from`, `count` leaves) up to level `to`
// through empty siblings.
void carry_up(uint8_t h[32], uint32_t key, int from, int to, uint32_t count) {
    for (int j = from; j < to; ++j) {
        const uint8_t* e = empty_hash(j).data();
        if (shr(key, j - from) & 1u) sha::node_hash(e, h, count, h);
        else sha::node_hash(h, e, count, h);
    }
}

// reserve() with geometric growth (an exact reserve per batch would copy the whole array each time).
template <class T>
void grow(std::vector<T>& v, size_t need) {
    if (need > v.capacity()) v.reserve(std::max(need, v.capacity() + v.capacity() / 2));
}

inline void put_element(uint8_t* e, const uint8_t* hash, uint32_t c) {
    std::memcpy(e, hash, 32);
    e[32] = uint8_t(c); e[33] = uint8_t(c >> 8); e[34] = uint8_t(c >> 16); e[35] = uint8_t(c >> 24);
}

}  // namespace

void set_max_threads(int n) { g_max_threads = std::max(1, n); }

int max_threads() {
    const int n = g_max_threads.load();
    if (n > 0) return n;
    const unsigned hw = std::thread::hardware_concurrency();
    return int(std::min<unsigned>(hw ? hw : 1, 8));
}

const Hash& empty_hash(int height) {
    static const std::array<Hash, kMaxDepth + 1> e = make_empty_hashes();
    return e.at(size_t(height));
}

int depth_for(uint32_t max_nonce) {
    int bits = 1;
    while (bits < 32 && (max_nonce >> bits) != 0) ++bits;
    return std::max(kDefaultDepth, bits);
}

const char* verify_reason(int code) {
    switch (code) {
        case kValid: return "valid";
        case kEmptyProof: return "empty proof";
        case kProofTooLong: return "proof longer than 32 elements";
        case kZeroCount: return "count is 0";
        case kIndexOutOfRange: return "dense index >= count";
        case kBadElementSize: return "a proof element is not 36 bytes";
        case kCountOverflow: return "sibling counts overflow uint32";
        case kCountMismatch: return "the proof's leaf count differs from count";
        case kRootMismatch: return "the recomputed root differs from root";
        case kIndexMismatch: return "the proof's dense index differs from dense_index";
        default: return "unknown";
    }
}

namespace {

inline uint32_t load_le32(const uint8_t* p) {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
inline bool path_right(uint32_t nonce, size_t depth, size_t i) {
    const size_t shift = depth - 1 - i;  // < 32 (depth <= 32)
    return (nonce >> shift) & 1u;
}

int precheck(uint64_t count, uint64_t dense_index, size_t n_elements) {
    if (n_elements == 0) return kEmptyProof;
    if (n_elements > size_t(kMaxDepth)) return kProofTooLong;
    if (count == 0) return kZeroCount;
    if (dense_index >= count) return kIndexOutOfRange;
    return kValid;
}

}  // namespace

int verify(const uint8_t root[32], uint64_t count, uint64_t dense_index, uint32_t nonce, const uint8_t* leaf_data,
           size_t leaf_len, const uint8_t* proof, size_t n_elements, const size_t* element_sizes) {
    if (int c = precheck(count, dense_index, n_elements)) return c;
    if (element_sizes)
        for (size_t i = 0; i < n_elements; ++i)
            if (element_sizes[i] != kProofElementSize) return kBadElementSize;
    uint8_t h[32];
    sha::leaf_hash(leaf_data, leaf_len, h);
    uint64_t c = 1, index = 0;
    for (size_t i = n_elements; i-- > 0;) {
        const uint8_t* e = proof + i * kProofElementSize;
        const uint32_t sc = load_le32(e + 32);
        c += sc;
        if (c > 0xFFFFFFFFull) return kCountOverflow;
        if (path_right(nonce, n_elements, i)) {
            index += sc;
            sha::node_hash(e, h, uint32_t(c), h);
        } else {
            sha::node_hash(h, e, uint32_t(c), h);
        }
    }
    if (c != count) return kCountMismatch;
    if (std::memcmp(h, root, 32) != 0) return kRootMismatch;
    if (index != dense_index) return kIndexMismatch;
    return kValid;
}

void verify_many(const uint8_t root[32], uint64_t count, size_t n, const uint64_t* dense_indices,
                 const uint32_t* nonces, const uint8_t* leaf_data, size_t leaf_len, const uint8_t* proofs,
                 size_t depth, int* codes) {
    const size_t stride = depth * kProofElementSize;
    size_t k = 0;
    // Pairs of proofs hashed in lockstep (node_hash_x2) when both pass the prechecks.
    for (; k + 1 < n; k += 2) {
        const int p0 = precheck(count, dense_indices[k], depth);
        const int p1 = precheck(count, dense_indices[k + 1], depth);
        if (p0 || p1) {
            for (size_t j = k; j < k + 2; ++j)
                codes[j] = verify(root, count, dense_indices[j], nonces[j], leaf_data + j * leaf_len, leaf_len,
                                  proofs + j * stride, depth);
            continue;
        }
        uint8_t h[2][32];
        uint64_t c[2] = {1, 1}, index[2] = {0, 0};
        int code[2] = {kValid, kValid};
        for (int j = 0; j < 2; ++j) sha::leaf_hash(leaf_data + (k + j) * leaf_len, leaf_len, h[j]);
        for (size_t i = depth; i-- > 0;) {
            const uint8_t* lr[2][2];
            uint32_t cc[2];
            for (int j = 0; j < 2; ++j) {
                const uint8_t* e = proofs + (k + j) * stride + i * kProofElementSize;
                const uint32_t sc = load_le32(e + 32);
                c[j] += sc;
                if (c[j] > 0xFFFFFFFFull) code[j] = kCountOverflow;
                cc[j] = uint32_t(c[j]);
                if (path_right(nonces[k + j], depth, i)) {
                    index[j] += sc;
                    lr[j][0] = e; lr[j][1] = h[j];
                } else {
                    lr[j][0] = h[j]; lr[j][1] = e;
                }
            }
            sha::node_hash_x2(lr[0][0], lr[0][1], cc[0], h[0], lr[1][0], lr[1][1], cc[1], h[1]);
        }
        for (int j = 0; j < 2; ++j) {
            int r = code[j];
            if (r == kValid && c[j] != count) r = kCountMismatch;
            if (r == kValid && std::memcmp(h[j], root, 32) != 0) r = kRootMismatch;
            if (r == kValid && index[j] != dense_indices[k + j]) r = kIndexMismatch;
            codes[k + j] = r;
        }
    }
    for (; k < n; ++k)
        codes[k] = verify(root, count, dense_indices[k], nonces[k], leaf_data + k * leaf_len, leaf_len,
                          proofs + k * stride, depth);
}

// ------------------------------------------------------------------------------------------ Smst

bool Smst::NonceSet::insert(uint32_t nonce) {
    if ((used + 1) * 2 > slots.size()) reserve(std::max<size_t>(used + 1, 16));
    const size_t mask = slots.size() - 1;
    size_t i = size_t((uint64_t(nonce) * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    const uint64_t v = uint64_t(nonce) + 1;
    while (slots[i] != 0) {
        if (slots[i] == v) return false;
        i = (i + 1) & mask;
    }
    slots[i] = v;
    ++used;
    return true;
}

bool Smst::NonceSet::contains(uint32_t nonce) const {
    if (slots.empty()) return false;
    const size_t mask = slots.size() - 1;
    size_t i = size_t((uint64_t(nonce) * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    const uint64_t v = uint64_t(nonce) + 1;
    while (slots[i] != 0) {
        if (slots[i] == v) return true;
        i = (i + 1) & mask;
    }
    return false;
}

void Smst::NonceSet::reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    if (cap <= slots.size()) return;
    std::vector<uint64_t> old;
    old.swap(slots);
    slots.assign(cap, 0);
    used = 0;
    for (uint64_t v : old)
        if (v) insert(uint32_t(v - 1));
}

void Smst::NonceSet::clear() {
    slots.clear();
    used = 0;
}

Smst::Smst() : offsets_{0}, root_(kNil) {}

void Smst::check_vectors(size_t n, const size_t* lens) const {
    for (size_t i = 0; i < n; ++i)
        if (lens[i] == 0)
            throw std::invalid_argument("empty vector at batch position " + std::to_string(i) +
                                        " (the SMST commits non-empty byte strings only)");
    if (nonces_.size() + n > 0xFFFFFFFFull) throw std::length_error("too many leaves (limit 2**32 - 1)");
}

void Smst::append_unlocked(uint32_t nonce, const uint8_t* vector, size_t len) {
    nonces_.push_back(nonce);
    data_.insert(data_.end(), vector, vector + len);
    offsets_.push_back(data_.size());
    max_nonce_ = std::max(max_nonce_, nonce);
}

void Smst::rollback_set() {
    set_.clear();
    set_.reserve(nonces_.size());
    for (uint32_t x : nonces_) set_.insert(x);
}

static std::string duplicate_message(uint32_t nonce, size_t position) {
    return "duplicate nonce " + std::to_string(int32_t(nonce)) + " at batch position " + std::to_string(position) +
           " (each nonce has exactly one slot; nothing was inserted)";
}

void Smst::insert(uint32_t nonce, const uint8_t* vector, size_t len) {
    std::lock_guard<std::mutex> lk(mu_);
    check_vectors(1, &len);
    if (!set_.insert(nonce)) throw std::invalid_argument(duplicate_message(nonce, 0));
    append_unlocked(nonce, vector, len);
}

void Smst::extend(size_t n, const uint32_t* nonces, const uint8_t* const* vectors, const size_t* lens) {
    std::lock_guard<std::mutex> lk(mu_);
    check_vectors(n, lens);
    set_.reserve(nonces_.size() + n);
    for (size_t i = 0; i < n; ++i) {
        if (!set_.insert(nonces[i])) {
            rollback_set();
            throw std::invalid_argument(duplicate_message(nonces[i], i));
        }
    }
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) total += lens[i];
    grow(data_, data_.size() + total);
    grow(nonces_, nonces_.size() + n);
    grow(offsets_, offsets_.size() + n);
    for (size_t i = 0; i < n; ++i) append_unlocked(nonces[i], vectors[i], lens[i]);
}

void Smst::extend_fixed(size_t n, const uint32_t* nonces, const uint8_t* vectors, size_t len) {
    std::lock_guard<std::mutex> lk(mu_);
    if (n == 0) return;
    if (len == 0) throw std::invalid_argument("empty vectors (the SMST commits non-empty byte strings only)");
    if (nonces_.size() + n > 0xFFFFFFFFull) throw std::length_error("too many leaves (limit 2**32 - 1)");
    set_.reserve(nonces_.size() + n);
    for (size_t i = 0; i < n; ++i) {
        if (!set_.insert(nonces[i])) {
            rollback_set();
            throw std::invalid_argument(duplicate_message(nonces[i], i));
        }
    }
    nonces_.insert(nonces_.end(), nonces, nonces + n);
    const size_t base = data_.size();
    data_.insert(data_.end(), vectors, vectors + n * len);
    grow(offsets_, offsets_.size() + n);
    for (size_t i = 0; i < n; ++i) {
        offsets_.push_back(base + (i + 1) * len);
        max_nonce_ = std::max(max_nonce_, nonces[i]);
    }
}

uint64_t Smst::count() const {
    std::lock_guard<std::mutex> lk(mu_);
    return nonces_.size();
}

int Smst::depth() const {
    std::lock_guard<std::mutex> lk(mu_);
    return nonces_.empty() ? kDefaultDepth : depth_for(max_nonce_);
}

bool Smst::contains(uint32_t nonce) const {
    std::lock_guard<std::mutex> lk(mu_);
    return set_.contains(nonce);
}

void Smst::leaf_hash_of(uint32_t a, uint8_t out[32]) const {
    sha::leaf_hash_parts(nonces_[a], data_.data() + offsets_[a], size_t(offsets_[a + 1] - offsets_[a]), out);
}

// ------------------------------------------------------------------------------ building the tree

void Smst::sync_unlocked() { sync_to_unlocked(nonces_.size()); }

void Smst::sync_to_unlocked(uint64_t n) {
    if (n <= synced_) return;
    memos_.clear();
    memo_order_.clear();
    uint32_t m = synced_max_;
    for (uint64_t a = synced_; a < n; ++a) m = std::max(m, nonces_[size_t(a)]);
    const int depth = depth_for(m);
    const uint64_t pending = n - synced_;
    // Few new leaves: insert them and rehash their paths. Many: one bulk build is cheaper.
    if (root_ == kNil || pending > std::max<uint64_t>(4096, synced_ / 8)) {
        rebuild_unlocked(n, depth);
    } else {
        std::vector<uint64_t> fresh;
        fresh.reserve(size_t(pending));
        for (uint64_t a = synced_; a < n; ++a) fresh.push_back((uint64_t(nonces_[size_t(a)]) << 32) | a);
        sort_by_key(fresh);  // neighbouring paths: the descents stay in cache
        for (uint64_t w : fresh) insert_leaf_unlocked(uint32_t(w >> 32), uint32_t(w));
        PNode& r = nodes_[root_];
        if (r.top != depth) {
            r.top = uint8_t(depth);
            r.dirty = 1;
        }
        rehash_unlocked(root_);
    }
    synced_ = n;
    synced_max_ = m;
}

void Smst::insert_leaf_unlocked(uint32_t key, uint32_t arrival) {
    PNode leaf{};
    leaf.key = key;
    leaf.count = 1;
    leaf.child[0] = arrival;
    leaf.child[1] = kNil;
    leaf.min_arr = leaf.max_arr = arrival;
    leaf.dirty = 1;
    uint32_t* slot = &root_;
    for (;;) {
        PNode& n = nodes_[*slot];
        const uint32_t prefix = shr(key, n.level);
        if (prefix == n.key) {  // inside n's subtree: n is a branching node (keys are unique)
            if (n.level == 0) throw std::logic_error("SMST: key already in the tree");
            n.count += 1;
            n.min_arr = std::min(n.min_arr, arrival);
            n.max_arr = std::max(n.max_arr, arrival);
            n.dirty = 1;
            slot = &n.child[shr(key, n.level - 1) & 1u];
            continue;
        }
        // A new branching node where the key leaves n's prefix, between n and its parent.
        const int split = n.level + bitlen(prefix ^ n.key);
        PNode b{};
        b.level = uint8_t(split);
        b.key = shr(key, split);
        b.count = n.count + 1;
        b.min_arr = std::min(n.min_arr, arrival);
        b.max_arr = std::max(n.max_arr, arrival);
        b.top = n.top;
        b.dirty = 1;
        leaf.top = uint8_t(split - 1);
        n.top = uint8_t(split - 1);
        n.dirty = 1;
        const uint32_t old = *slot;
        const uint32_t leaf_id = nodes_.push_back(leaf);
        const int side = int(shr(key, split - 1) & 1u);
        b.child[side] = leaf_id;
        b.child[1 - side] = old;
        *slot = nodes_.push_back(b);  // slot points into a node: arena references stay valid
        return;
    }
}

void Smst::rehash_unlocked(uint32_t id) {
    PNode& n = nodes_[id];
    if (!n.dirty) return;
    uint8_t h[32];
    if (n.level == 0) {
        leaf_hash_of(n.child[0], h);
    } else {
        rehash_unlocked(n.child[0]);
        rehash_unlocked(n.child[1]);
        sha::node_hash(nodes_[n.child[0]].hash, nodes_[n.child[1]].hash, n.count, h);
    }
    carry_up(h, n.key, n.level, n.top, n.count);
    std::memcpy(n.hash, h, 32);
    n.dirty = 0;
}

void Smst::rebuild_unlocked(uint64_t count, int depth) {
    const size_t n = size_t(count);
    std::vector<uint64_t> order(n);
    for (size_t a = 0; a < n; ++a) order[a] = (uint64_t(nonces_[a]) << 32) | a;
    sort_by_key(order);
    // Leaf hashes in arrival order (the leaf bytes are read front to back), then placed in key order.
    std::vector<uint8_t> leaf_hash(32 * n);
    parallel_chunks(n, [&](size_t b, size_t e) {
        sha::LeafJob jobs[256];
        size_t k = 0;
        for (size_t a = b; a < e; ++a) {
            jobs[k++] = {nonces_[a], data_.data() + offsets_[a], size_t(offsets_[a + 1] - offsets_[a]),
                         leaf_hash.data() + 32 * a};
            if (k == 256) {
                sha::leaf_hash_batch(jobs, k);
                k = 0;
            }
        }
        sha::leaf_hash_batch(jobs, k);
    });
    nodes_.clear();
    nodes_.resize(n);  // n leaves (ids 0..n-1, in key order), then n - 1 branching nodes
    parallel_chunks(n, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) {
            if (i + 16 < e) __builtin_prefetch(leaf_hash.data() + 32 * size_t(uint32_t(order[i + 16])));
            PNode& l = nodes_[i];
            const uint32_t a = uint32_t(order[i]);
            std::memcpy(l.hash, leaf_hash.data() + 32 * size_t(a), 32);
            l.key = uint32_t(order[i] >> 32);
            l.count = 1;
            l.child[0] = a;
            l.child[1] = kNil;
            l.min_arr = l.max_arr = a;
            l.level = l.top = l.dirty = l.pad = 0;
        }
    });
    std::vector<uint64_t>().swap(order);
    std::vector<uint8_t>().swap(leaf_hash);

    // Structure: the keys are sorted, so the tree is built along its right spine (a stack); the
    // branching node between neighbours i-1, i sits at level bitlen(key[i-1] ^ key[i]). A node's
    // top is fixed when it gets its final parent (the popped subtree moves under the new node).
    std::vector<std::vector<uint32_t>> by_level(kMaxDepth + 1);
    std::vector<uint8_t> top(2 * n, 0);  // compact copy of the tops for the sweep below
    std::vector<uint32_t> spine;
    spine.reserve(kMaxDepth + 2);
    for (size_t i = 0; i < n; ++i) {
        if (i > 0) {
            const int level = bitlen(nodes_[i - 1].key ^ nodes_[i].key);
            uint32_t last = kNil;
            while (!spine.empty() && nodes_[spine.back()].level < level) {
                last = spine.back();
                spine.pop_back();
            }
            const uint32_t id = uint32_t(nodes_.size());  // = the push_back below
            PNode b{};
            b.level = uint8_t(level);
            b.key = shr(nodes_[i].key, level);
            b.child[0] = last;
            b.child[1] = uint32_t(i);
            if (!spine.empty()) {
                PNode& p = nodes_[spine.back()];
                p.child[1] = id;
                b.top = uint8_t(p.level - 1);
            }
            nodes_.push_back(b);
            nodes_[last].top = uint8_t(level - 1);
            nodes_[i].top = uint8_t(level - 1);
            top[last] = top[i] = uint8_t(level - 1);
            top[id] = b.top;
            spine.push_back(id);
            by_level[size_t(level)].push_back(id);
        }
        spine.push_back(uint32_t(i));
    }
    root_ = spine.front();
    nodes_[root_].top = uint8_t(depth);
    top[root_] = uint8_t(depth);

    // Hashes, level by level: at step j every node whose hash is at level j and whose top is higher
    // moves up one level (empty sibling), and every branching node at level j + 1 is hashed from its
    // children (whose tops are j). All hashes of one step are independent.
    std::vector<uint32_t> active, next;
    active.reserve(n);
    for (size_t i = 0; i < n; ++i)
        if (top[i] > 0) active.push_back(uint32_t(i));
    for (int j = 0; j < depth; ++j) {
        const uint8_t* e = empty_hash(j).data();
        parallel_chunks(active.size(), [&](size_t b, size_t end) {
            sha::NodeJob jobs[256];
            size_t k = 0;
            for (size_t i = b; i < end; ++i) {
                if (i + 16 < end) __builtin_prefetch(&nodes_[active[i + 16]]);
                PNode& a = nodes_[active[i]];
                if (shr(a.key, j - a.level) & 1u) jobs[k++] = {e, a.hash, a.count, a.hash};
                else jobs[k++] = {a.hash, e, a.count, a.hash};
                if (k == 256) {
                    sha::node_hash_batch(jobs, k);
                    k = 0;
                }
            }
            sha::node_hash_batch(jobs, k);
        });
        const std::vector<uint32_t>& fresh = by_level[size_t(j) + 1];
        parallel_chunks(fresh.size(), [&](size_t b, size_t end) {
            sha::NodeJob jobs[256];
            size_t k = 0;
            for (size_t i = b; i < end; ++i) {
                if (i + 8 < end) {
                    const PNode& q = nodes_[fresh[i + 8]];
                    __builtin_prefetch(&nodes_[q.child[0]]);
                    __builtin_prefetch(&nodes_[q.child[1]]);
                }
                PNode& p = nodes_[fresh[i]];
                const PNode& l = nodes_[p.child[0]];
                const PNode& r = nodes_[p.child[1]];
                p.count = l.count + r.count;
                p.min_arr = std::min(l.min_arr, r.min_arr);
                p.max_arr = std::max(l.max_arr, r.max_arr);
                jobs[k++] = {l.hash, r.hash, p.count, p.hash};
                if (k == 256) {
                    sha::node_hash_batch(jobs, k);
                    k = 0;
                }
            }
            sha::node_hash_batch(jobs, k);
        });
        next.clear();
        for (uint32_t id : active)
            if (top[id] > j + 1) next.push_back(id);
        for (uint32_t id : fresh)
            if (top[id] > j + 1) next.push_back(id);
        active.swap(next);
    }
}

// ------------------------------------------------------------------------------ snapshots, proofs

void Smst::check_count(uint64_t c) const {
    const uint64_t n = nonces_.size();
    if (c == 0 || c > n)
        throw SnapshotNotFound("no snapshot at count " + std::to_string(c) + ": the tree has " + std::to_string(n) +
                               " leaves (valid counts are 1.." + std::to_string(n) + ")");
}

int Smst::depth_of_snapshot(uint64_t c) const {
    if (c == nonces_.size()) return depth_for(max_nonce_);
    if (c == synced_) return depth_for(synced_max_);
    uint32_t m = 0;
    for (uint64_t a = 0; a < c; ++a) m = std::max(m, nonces_[size_t(a)]);
    return depth_for(m);
}

// The snapshot's leaves all have keys < 2**depth_c: they sit below child 0 of every node above that level.
uint32_t Smst::snapshot_start(int depth_c) const {
    uint32_t id = root_;
    while (nodes_[id].level > depth_c) id = nodes_[id].child[0];
    return id;
}

Smst::Memo& Smst::memo_for(uint64_t c) {
    auto it = memos_.find(c);
    if (it != memos_.end()) return it->second;
    if (memo_order_.size() >= kMemoCacheSize) {
        memos_.erase(memo_order_.front());
        memo_order_.erase(memo_order_.begin());
    }
    memo_order_.push_back(c);
    return memos_[c];
}

Smst::HashCount Smst::hash_at(uint32_t id, int target, uint64_t c, Memo& memo) const {
    const PNode& n = nodes_[id];
    HashCount r;
    if (n.min_arr >= c) {  // nothing of this subtree had arrived
        r.hash = empty_hash(target);
        r.count = 0;
        return r;
    }
    if (n.max_arr < c && target == n.top) {  // untouched since c
        std::memcpy(r.hash.data(), n.hash, 32);
        r.count = n.count;
        return r;
    }
    const bool at_top = target == n.top;
    if (at_top) {
        auto it = memo.find(id);
        if (it != memo.end()) return it->second;
    }
    if (n.level == 0) {
        leaf_hash_of(n.child[0], r.hash.data());
        r.count = 1;
    } else {
        const HashCount a = hash_at(n.child[0], n.level - 1, c, memo);
        const HashCount b = hash_at(n.child[1], n.level - 1, c, memo);
        r.count = a.count + b.count;
        sha::node_hash(a.hash.data(), b.hash.data(), r.count, r.hash.data());
    }
    carry_up(r.hash.data(), n.key, n.level, target, r.count);
    if (at_top) memo.emplace(id, r);
    return r;
}

uint32_t Smst::walk(uint64_t d, uint64_t c, int depth_c, Memo* memo, uint8_t* out) const {
    const bool whole = c == nonces_.size();  // the current tree: stored hashes everywhere
    uint32_t id = whole ? root_ : snapshot_start(depth_c);
    int top = depth_c;
    uint64_t rem = d;
    for (;;) {
        const PNode& n = nodes_[id];
        if (out)
            for (int j = n.level; j < top; ++j)
                put_element(out + size_t(depth_c - 1 - j) * kProofElementSize, empty_hash(j).data(), 0);
        if (n.level == 0) return n.child[0];
        const PNode& l = nodes_[n.child[0]];
        const PNode& r = nodes_[n.child[1]];
        uint8_t* e = out ? out + size_t(depth_c - n.level) * kProofElementSize : nullptr;
        int side;
        if (whole) {
            side = rem < l.count ? 0 : 1;
            if (side) rem -= l.count;
            const PNode& sib = side ? l : r;
            if (e) put_element(e, sib.hash, sib.count);
        } else {
            const HashCount hl = hash_at(n.child[0], n.level - 1, c, *memo);
            side = rem < hl.count ? 0 : 1;
            if (side) {
                rem -= hl.count;
                if (e) put_element(e, hl.hash.data(), hl.count);
            } else if (e) {
                const HashCount hr = hash_at(n.child[1], n.level - 1, c, *memo);
                put_element(e, hr.hash.data(), hr.count);
            }
        }
        top = n.level - 1;
        id = n.child[side];
    }
}

static void check_index(uint64_t dense_index, uint64_t count) {
    if (dense_index >= count)
        throw std::out_of_range("dense index " + std::to_string(dense_index) + " out of range: the tree at count " +
                                std::to_string(count) + " has dense indices 0.." +
                                (count ? std::to_string(count - 1) : std::string("(none)")));
}

Hash Smst::root_at(uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    sync_unlocked();
    const uint64_t n = nonces_.size();
    if (count == 0 && n == 0) return empty_hash(kDefaultDepth);
    const uint64_t c = count == 0 ? n : count;
    check_count(c);
    Hash h;
    if (c == n) {
        std::memcpy(h.data(), nodes_[root_].hash, 32);
        return h;
    }
    const int depth_c = depth_of_snapshot(c);
    return hash_at(snapshot_start(depth_c), depth_c, c, memo_for(c)).hash;
}

std::vector<Hash> Smst::roots_at(const std::vector<uint64_t>& counts) {
    std::lock_guard<std::mutex> lk(mu_);
    for (uint64_t c : counts) check_count(c);
    std::vector<size_t> order(counts.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return counts[a] < counts[b]; });
    std::vector<Hash> out(counts.size());
    for (size_t k : order) {
        const uint64_t c = counts[k];
        if (c >= synced_) {  // grow the tree up to c: the root is then the tree's own
            sync_to_unlocked(c);
            std::memcpy(out[k].data(), nodes_[root_].hash, 32);
        } else {
            const int depth_c = depth_of_snapshot(c);
            out[k] = hash_at(snapshot_start(depth_c), depth_c, c, memo_for(c)).hash;
        }
    }
    return out;
}

int Smst::depth_at(uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    if (count == 0) return nonces_.empty() ? kDefaultDepth : depth_for(max_nonce_);
    check_count(count);
    return depth_of_snapshot(count);
}

std::string Smst::proof(uint64_t dense_index, uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    sync_unlocked();
    const uint64_t c = count == 0 ? nonces_.size() : count;
    if (count) check_count(c);
    check_index(dense_index, c);
    const int depth_c = depth_of_snapshot(c);
    std::string out(size_t(depth_c) * kProofElementSize, '\0');
    Memo* memo = c == nonces_.size() ? nullptr : &memo_for(c);
    walk(dense_index, c, depth_c, memo, reinterpret_cast<uint8_t*>(out.data()));
    return out;
}

void Smst::proofs(size_t n, const uint64_t* dense_indices, uint64_t count, uint8_t* out) {
    std::lock_guard<std::mutex> lk(mu_);
    sync_unlocked();
    const uint64_t c = count == 0 ? nonces_.size() : count;
    if (count) check_count(c);
    for (size_t i = 0; i < n; ++i) check_index(dense_indices[i], c);
    if (n == 0) return;
    const int depth_c = depth_of_snapshot(c);
    const size_t stride = size_t(depth_c) * kProofElementSize;
    // Walk in dense-index order: neighbouring walks share their upper paths (cache friendly).
    std::vector<uint64_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = (dense_indices[i] << 32) | i;
    if (n >= 64 && n <= 0xFFFFFFFFull && c <= 0xFFFFFFFFull) sort_by_key(order);
    else for (size_t i = 0; i < n; ++i) order[i] = i;  // (no packing possible: keep the given order)
    const bool packed = n >= 64 && n <= 0xFFFFFFFFull && c <= 0xFFFFFFFFull;
    auto item = [&](size_t k) { return packed ? size_t(uint32_t(order[k])) : size_t(order[k]); };
    if (c == nonces_.size()) {
        parallel_chunks(n, [&](size_t b, size_t e) {
            for (size_t k = b; k < e; ++k) {
                const size_t i = item(k);
                walk(dense_indices[i], c, depth_c, nullptr, out + i * stride);
            }
        });
        return;
    }
    Memo& memo = memo_for(c);
    for (size_t k = 0; k < n; ++k) {
        const size_t i = item(k);
        walk(dense_indices[i], c, depth_c, &memo, out + i * stride);
    }
}

void Smst::arrivals(size_t n, const uint64_t* dense_indices, uint64_t count, uint32_t* out) {
    std::lock_guard<std::mutex> lk(mu_);
    sync_unlocked();
    const uint64_t c = count == 0 ? nonces_.size() : count;
    if (count) check_count(c);
    for (size_t i = 0; i < n; ++i) check_index(dense_indices[i], c);
    if (n == 0) return;
    const int depth_c = depth_of_snapshot(c);
    Memo* memo = c == nonces_.size() ? nullptr : &memo_for(c);
    for (size_t i = 0; i < n; ++i) out[i] = walk(dense_indices[i], c, depth_c, memo, nullptr);
}

std::pair<uint32_t, std::string> Smst::artifact(uint64_t dense_index, uint64_t count) {
    uint32_t a = 0;
    arrivals(1, &dense_index, count, &a);
    return arrival_leaf(a);
}

std::pair<uint32_t, std::string> Smst::arrival_leaf(uint64_t arrival_index) const {
    std::lock_guard<std::mutex> lk(mu_);
    if (arrival_index >= nonces_.size())
        throw std::out_of_range("arrival index " + std::to_string(arrival_index) + " out of range (count " +
                                std::to_string(nonces_.size()) + ")");
    const size_t a = size_t(arrival_index);
    return {nonces_[a], std::string(reinterpret_cast<const char*>(data_.data() + offsets_[a]),
                                    size_t(offsets_[a + 1] - offsets_[a]))};
}

size_t Smst::memory_bytes() const {
    std::lock_guard<std::mutex> lk(mu_);
    size_t memo = 0;
    for (const auto& kv : memos_) memo += kv.second.size() * (sizeof(HashCount) + 32) + kv.second.bucket_count() * 8;
    return nonces_.capacity() * 4 + data_.capacity() + offsets_.capacity() * 8 + set_.slots.capacity() * 8 +
           nodes_.bytes() + memo;
}

}  // namespace cpoc::smst
