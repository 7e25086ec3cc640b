// SMST core (no Python here; bindings in merkle_bindings.cpp). See smst.h for the normative bytes.
#include "smst.h"

#include <algorithm>
#include <cstring>

#include "sha256.h"

namespace cpoc::smst {
namespace {

constexpr size_t kSnapshotCacheSize = 4;

std::array<Hash, kMaxDepth + 1> make_empty_hashes() {
    std::array<Hash, kMaxDepth + 1> e{};
    const uint8_t zero = 0x00;
    sha::sha256(&zero, 1, e[0].data());
    for (int h = 1; h <= kMaxDepth; ++h) sha::node_hash(e[h - 1].data(), e[h - 1].data(), 0, e[h].data());
    return e;
}

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

struct HashJob {
    const uint8_t* left;
    const uint8_t* right;
    uint32_t count;
    uint8_t* out;
};

void run_jobs(const std::vector<HashJob>& jobs) {
    size_t i = 0;
    for (; i + 1 < jobs.size(); i += 2) {
        const HashJob& a = jobs[i];
        const HashJob& b = jobs[i + 1];
        sha::node_hash_x2(a.left, a.right, a.count, a.out, b.left, b.right, b.count, b.out);
    }
    if (i < jobs.size()) sha::node_hash(jobs[i].left, jobs[i].right, jobs[i].count, jobs[i].out);
}

// Builds levels 1..depth above t.levels[0]. dirty0[i] marks leaves not present in `old`; a parent
// whose children are all clean takes its hash from `old` (which then holds the same subtree).
void build_levels(Tree& t, std::vector<uint8_t> dirty, const Tree* old) {
    t.levels.resize(size_t(t.depth) + 1);
    std::vector<HashJob> jobs;
    for (int l = 0; l < t.depth; ++l) {
        std::vector<Node>& cur = t.levels[size_t(l)];
        std::vector<Node>& next = t.levels[size_t(l) + 1];
        next.clear();
        next.reserve(cur.size() / 2 + 1);
        std::vector<uint8_t> next_dirty;
        next_dirty.reserve(cur.size() / 2 + 1);
        const std::vector<Node>* old_next =
            (old && size_t(l) + 1 < old->levels.size()) ? &old->levels[size_t(l) + 1] : nullptr;
        size_t op = 0;
        const uint8_t* empty = empty_hash(l).data();
        jobs.clear();
        const size_t n = cur.size();
        for (size_t i = 0; i < n;) {
            Node* left = nullptr;
            Node* right = nullptr;
            bool d = dirty[i];
            if (cur[i].key & 1u) {
                right = &cur[i++];
            } else {
                left = &cur[i++];
                if (i < n && cur[i].key == left->key + 1) {
                    d = d || dirty[i];
                    right = &cur[i++];
                }
            }
            Node parent;
            parent.key = (left ? left->key : right->key) >> 1;
            parent.count = (left ? left->count : 0) + (right ? right->count : 0);
            parent.parent = 0;
            const uint32_t idx = uint32_t(next.size());
            if (left) left->parent = idx;
            if (right) right->parent = idx;
            bool reused = false;
            if (!d && old_next) {
                while (op < old_next->size() && (*old_next)[op].key < parent.key) ++op;
                if (op < old_next->size() && (*old_next)[op].key == parent.key) {
                    std::memcpy(parent.hash, (*old_next)[op].hash, 32);
                    reused = true;
                }
            }
            next.push_back(parent);
            next_dirty.push_back(!reused);
            if (!reused) {
                jobs.push_back({left ? left->hash : empty, right ? right->hash : empty, parent.count, nullptr});
            }
        }
        // next no longer reallocates: point the jobs at their outputs, in order.
        size_t j = 0;
        for (size_t k = 0; k < next.size(); ++k)
            if (next_dirty[k]) jobs[j++].out = next[k].hash;
        run_jobs(jobs);
        dirty.swap(next_dirty);
    }
}

}  // namespace

const Hash& empty_hash(int height) {
    static const std::array<Hash, kMaxDepth + 1> e = make_empty_hashes();
    return e.at(size_t(height));
}

int depth_for(uint32_t max_nonce) {
    int bits = 1;
    while (bits < 32 && (max_nonce >> bits) != 0) ++bits;
    return std::max(kDefaultDepth, bits);
}

Hash Tree::root() const {
    if (count == 0) return empty_hash(depth);
    Hash h;
    std::memcpy(h.data(), levels[size_t(depth)][0].hash, 32);
    return h;
}

void Tree::proof(uint64_t dense_index, uint8_t* out) const {
    size_t p = size_t(dense_index);
    for (int l = 0; l < depth; ++l) {
        const std::vector<Node>& lv = levels[size_t(l)];
        const Node& node = lv[p];
        const Node* sib = nullptr;
        if (node.key & 1u) {
            if (p > 0 && lv[p - 1].key == node.key - 1) sib = &lv[p - 1];
        } else if (p + 1 < lv.size() && lv[p + 1].key == node.key + 1) {
            sib = &lv[p + 1];
        }
        uint8_t* e = out + size_t(depth - 1 - l) * kProofElementSize;
        const uint32_t c = sib ? sib->count : 0;
        std::memcpy(e, sib ? sib->hash : empty_hash(l).data(), 32);
        e[32] = uint8_t(c); e[33] = uint8_t(c >> 8); e[34] = uint8_t(c >> 16); e[35] = uint8_t(c >> 24);
        p = node.parent;
    }
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

Smst::Smst() : offsets_{0} {}

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
    data_.reserve(data_.size() + total);
    nonces_.reserve(nonces_.size() + n);
    offsets_.reserve(offsets_.size() + n);
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
    offsets_.reserve(offsets_.size() + n);
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

std::shared_ptr<const Tree> Smst::full_tree_unlocked() {
    const uint64_t n = nonces_.size();
    if (full_ && full_->count == n) return full_;
    const uint64_t start = full_ ? full_->count : 0;
    // Hash the new leaves (arrival order).
    leaf_hashes_.resize(size_t(n) * 32);
    for (uint64_t a = start; a < n; ++a)
        sha::leaf_hash_parts(nonces_[a], data_.data() + offsets_[a], size_t(offsets_[a + 1] - offsets_[a]),
                             leaf_hashes_.data() + 32 * a);
    std::vector<uint64_t> fresh;
    fresh.reserve(size_t(n - start));
    for (uint64_t a = start; a < n; ++a) fresh.push_back((uint64_t(nonces_[a]) << 32) | a);
    sort_by_key(fresh);

    auto t = std::make_shared<Tree>();
    t->count = n;
    t->depth = n ? depth_for(max_nonce_) : kDefaultDepth;
    if (n == 0) {
        full_ = t;
        return full_;
    }
    t->levels.resize(1);
    std::vector<Node>& level0 = t->levels[0];
    level0.reserve(size_t(n));
    t->arrival.reserve(size_t(n));
    std::vector<uint8_t> dirty;
    dirty.reserve(size_t(n));
    const std::vector<Node>* old0 = (full_ && full_->count) ? &full_->levels[0] : nullptr;
    size_t io = 0, in = 0;
    const size_t no = old0 ? old0->size() : 0;
    auto push_fresh = [&](uint64_t w) {
        const uint32_t a = uint32_t(w);
        Node leaf;
        std::memcpy(leaf.hash, leaf_hashes_.data() + 32 * size_t(a), 32);
        leaf.key = uint32_t(w >> 32);
        leaf.count = 1;
        leaf.parent = 0;
        level0.push_back(leaf);
        t->arrival.push_back(a);
        dirty.push_back(1);
    };
    while (io < no || in < fresh.size()) {
        if (in == fresh.size() || (io < no && (*old0)[io].key < uint32_t(fresh[in] >> 32))) {
            level0.push_back((*old0)[io]);
            t->arrival.push_back(full_->arrival[io]);
            dirty.push_back(0);
            ++io;
        } else {
            push_fresh(fresh[in++]);
        }
    }
    build_levels(*t, std::move(dirty), full_.get());
    full_ = t;
    return full_;
}

std::shared_ptr<const Tree> Smst::tree_at_unlocked(uint64_t count) {
    const uint64_t n = nonces_.size();
    if (count == 0 || count > n)
        throw SnapshotNotFound("no snapshot at count " + std::to_string(count) + ": the tree has " +
                               std::to_string(n) + " leaves (valid counts are 1.." + std::to_string(n) + ")");
    if (count == n) return full_tree_unlocked();
    auto it = snapshots_.find(count);
    if (it != snapshots_.end()) return it->second;
    std::shared_ptr<const Tree> full = full_tree_unlocked();
    auto t = std::make_shared<Tree>();
    t->count = count;
    t->levels.resize(1);
    t->levels[0].reserve(size_t(count));
    t->arrival.reserve(size_t(count));
    for (size_t i = 0; i < full->levels[0].size(); ++i) {
        if (full->arrival[i] < count) {
            t->levels[0].push_back(full->levels[0][i]);
            t->arrival.push_back(full->arrival[i]);
        }
    }
    t->depth = depth_for(t->levels[0].back().key);
    build_levels(*t, std::vector<uint8_t>(t->levels[0].size(), 1), nullptr);
    if (snapshot_order_.size() >= kSnapshotCacheSize) {
        snapshots_.erase(snapshot_order_.front());
        snapshot_order_.erase(snapshot_order_.begin());
    }
    snapshots_[count] = t;
    snapshot_order_.push_back(count);
    return t;
}

Hash Smst::root_at(uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    if (count == 0) {
        auto t = full_tree_unlocked();
        return t->root();
    }
    return tree_at_unlocked(count)->root();
}

int Smst::depth_at(uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    if (count == 0) return nonces_.empty() ? kDefaultDepth : depth_for(max_nonce_);
    return tree_at_unlocked(count)->depth;
}

static void check_index(uint64_t dense_index, const Tree& t) {
    if (dense_index >= t.count)
        throw std::out_of_range("dense index " + std::to_string(dense_index) + " out of range: the tree at count " +
                                std::to_string(t.count) + " has dense indices 0.." +
                                (t.count ? std::to_string(t.count - 1) : std::string("(none)")));
}

std::string Smst::proof(uint64_t dense_index, uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    auto t = count == 0 ? full_tree_unlocked() : tree_at_unlocked(count);
    check_index(dense_index, *t);
    std::string out(size_t(t->depth) * kProofElementSize, '\0');
    t->proof(dense_index, reinterpret_cast<uint8_t*>(out.data()));
    return out;
}

void Smst::proofs(size_t n, const uint64_t* dense_indices, uint64_t count, uint8_t* out) {
    std::lock_guard<std::mutex> lk(mu_);
    auto t = count == 0 ? full_tree_unlocked() : tree_at_unlocked(count);
    for (size_t i = 0; i < n; ++i) check_index(dense_indices[i], *t);
    const size_t stride = size_t(t->depth) * kProofElementSize;
    if (n < 64 || n > 0xFFFFFFFFull) {
        for (size_t i = 0; i < n; ++i) t->proof(dense_indices[i], out + i * stride);
        return;
    }
    // Walk the leaves in index order so each level is read front to back (cache friendly).
    std::vector<uint64_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = (dense_indices[i] << 32) | i;
    sort_by_key(order);
    for (uint64_t w : order) t->proof(w >> 32, out + size_t(uint32_t(w)) * stride);
}

std::pair<uint32_t, std::string> Smst::artifact(uint64_t dense_index, uint64_t count) {
    std::lock_guard<std::mutex> lk(mu_);
    auto t = count == 0 ? full_tree_unlocked() : tree_at_unlocked(count);
    check_index(dense_index, *t);
    const uint32_t a = t->arrival[size_t(dense_index)];
    return {nonces_[a], std::string(reinterpret_cast<const char*>(data_.data() + offsets_[a]),
                                    size_t(offsets_[a + 1] - offsets_[a]))};
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

}  // namespace cpoc::smst
