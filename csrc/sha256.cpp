// SHA-256: SHA-NI backend (x86, run-time detected through CPUID) and a portable fallback.
// Both are FIPS 180-4 exact; tests compare them with each other and with Python's hashlib.
#include "sha256.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define CPOC_HAVE_X86 1
#else
#define CPOC_HAVE_X86 0
#endif

namespace cpoc::sha {
namespace {

constexpr uint32_t kInit[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                               0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};

alignas(64) constexpr uint32_t kK[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};

// ---------------------------------------------------------------- portable backend
inline uint32_t rotr(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }
inline uint32_t load_be32(const uint8_t* p) {
    return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}
inline void store_be32(uint8_t* p, uint32_t v) {
    p[0] = uint8_t(v >> 24); p[1] = uint8_t(v >> 16); p[2] = uint8_t(v >> 8); p[3] = uint8_t(v);
}

void compress_portable(uint32_t st[8], const uint8_t* data, size_t nblocks) {
    for (; nblocks > 0; --nblocks, data += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; ++i) w[i] = load_be32(data + 4 * i);
        for (int i = 16; i < 64; ++i) {
            const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
            const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
        for (int i = 0; i < 64; ++i) {
            const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[i] + w[i];
            const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
        }
        st[0] += a; st[1] += b; st[2] += c; st[3] += d; st[4] += e; st[5] += f; st[6] += g; st[7] += h;
    }
}

// Hashes whole padded blocks from the initial state and writes the big-endian digest.
void digest_portable(const uint8_t* blocks, size_t nblocks, uint8_t out[32]) {
    uint32_t st[8];
    std::memcpy(st, kInit, sizeof st);
    compress_portable(st, blocks, nblocks);
    for (int i = 0; i < 8; ++i) store_be32(out + 4 * i, st[i]);
}

// ---------------------------------------------------------------- SHA-NI backend
#if CPOC_HAVE_X86
#define CPOC_SHANI __attribute__((target("sha,sse4.1,ssse3")))

struct ShaniState {
    __m128i abef, cdgh;
};

CPOC_SHANI inline ShaniState shani_load(const uint32_t st[8]) {
    __m128i tmp = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st));
    __m128i s1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 4));
    tmp = _mm_shuffle_epi32(tmp, 0xB1);                    // CDAB
    s1 = _mm_shuffle_epi32(s1, 0x1B);                      // EFGH
    return {_mm_alignr_epi8(tmp, s1, 8), _mm_blend_epi16(s1, tmp, 0xF0)};  // ABEF, CDGH
}

// Writes the digest bytes (big-endian words a..h).
CPOC_SHANI inline void shani_store_digest(const ShaniState& s, uint8_t out[32]) {
    const __m128i tmp = _mm_shuffle_epi32(s.abef, 0x1B);   // FEBA
    const __m128i s1 = _mm_shuffle_epi32(s.cdgh, 0xB1);    // DCHG
    const __m128i dcba = _mm_blend_epi16(tmp, s1, 0xF0);   // DCBA (words a,b,c,d in memory order)
    const __m128i hgfe = _mm_alignr_epi8(s1, tmp, 8);      // HGFE
    const __m128i bswap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(dcba, bswap));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_shuffle_epi8(hgfe, bswap));
}

// One 64-byte block for each of N independent states, the N streams interleaved instruction by
// instruction so that the rounds' latency overlaps (N = 1 or 2).
template <int N>
CPOC_SHANI __attribute__((always_inline)) inline void shani_block(ShaniState* s, const uint8_t* const* blk) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i save0[N], save1[N], w[N][4];
    for (int j = 0; j < N; ++j) {
        save0[j] = s[j].abef;
        save1[j] = s[j].cdgh;
    }
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) {
        const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * g));
        for (int j = 0; j < N; ++j) {
            __m128i& wg = w[j][g & 3];
            if (g < 4) {
                wg = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[j] + 16 * g)), bswap);
            } else {
                // W[g] = msg2(msg1(W[g-4], W[g-3]) + alignr(W[g-1], W[g-2], 4), W[g-1])
                const __m128i& w1 = w[j][(g - 1) & 3];
                const __m128i& w2 = w[j][(g - 2) & 3];
                const __m128i& w3 = w[j][(g - 3) & 3];
                __m128i t = _mm_sha256msg1_epu32(wg, w3);
                t = _mm_add_epi32(t, _mm_alignr_epi8(w1, w2, 4));
                wg = _mm_sha256msg2_epu32(t, w1);
            }
            __m128i msg = _mm_add_epi32(wg, k);
            s[j].cdgh = _mm_sha256rnds2_epu32(s[j].cdgh, s[j].abef, msg);
            msg = _mm_shuffle_epi32(msg, 0x0E);
            s[j].abef = _mm_sha256rnds2_epu32(s[j].abef, s[j].cdgh, msg);
        }
    }
    for (int j = 0; j < N; ++j) {
        s[j].abef = _mm_add_epi32(s[j].abef, save0[j]);
        s[j].cdgh = _mm_add_epi32(s[j].cdgh, save1[j]);
    }
}

CPOC_SHANI void digest_shani(const uint8_t* blocks, size_t nblocks, uint8_t out[32]) {
    ShaniState s = shani_load(kInit);
    for (size_t b = 0; b < nblocks; ++b) {
        const uint8_t* p = blocks + 64 * b;
        shani_block<1>(&s, &p);
    }
    shani_store_digest(s, out);
}

// Two messages of two blocks each, interleaved.
CPOC_SHANI void digest2_shani_x2(const uint8_t* m0, const uint8_t* m1, uint8_t out0[32], uint8_t out1[32]) {
    ShaniState s[2] = {shani_load(kInit), shani_load(kInit)};
    const uint8_t* first[2] = {m0, m1};
    shani_block<2>(s, first);
    const uint8_t* second[2] = {m0 + 64, m1 + 64};
    shani_block<2>(s, second);
    shani_store_digest(s[0], out0);
    shani_store_digest(s[1], out1);
}

// Four messages of `nblocks` padded blocks each, interleaved.
CPOC_SHANI void digest_shani_x4(const uint8_t* const m[4], size_t nblocks, uint8_t* const out[4]) {
    ShaniState s[4] = {shani_load(kInit), shani_load(kInit), shani_load(kInit), shani_load(kInit)};
    for (size_t b = 0; b < nblocks; ++b) {
        const uint8_t* blk[4] = {m[0] + 64 * b, m[1] + 64 * b, m[2] + 64 * b, m[3] + 64 * b};
        shani_block<4>(s, blk);
    }
    for (int j = 0; j < 4; ++j) shani_store_digest(s[j], out[j]);
}

CPOC_SHANI void compress_shani(uint32_t st[8], const uint8_t* blocks, size_t nblocks) {
    ShaniState s = shani_load(st);
    for (size_t b = 0; b < nblocks; ++b) {
        const uint8_t* p = blocks + 64 * b;
        shani_block<1>(&s, &p);
    }
    uint8_t tmp[32];  // back to a..h word order
    shani_store_digest(s, tmp);
    for (int i = 0; i < 8; ++i) st[i] = load_be32(tmp + 4 * i);
}

bool detect_shani() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool ssse3 = c & (1u << 9), sse41 = c & (1u << 19);
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool sha = b & (1u << 29);
    return ssse3 && sse41 && sha;
}
#else
bool detect_shani() { return false; }
#endif

const bool kShaniAvailable = detect_shani();
std::atomic<bool> g_use_shani{kShaniAvailable};

inline void digest_blocks(const uint8_t* blocks, size_t nblocks, uint8_t out[32]) {
#if CPOC_HAVE_X86
    if (g_use_shani.load(std::memory_order_relaxed)) return digest_shani(blocks, nblocks, out);
#endif
    digest_portable(blocks, nblocks, out);
}

inline void compress_any(uint32_t st[8], const uint8_t* blocks, size_t nblocks) {
#if CPOC_HAVE_X86
    if (g_use_shani.load(std::memory_order_relaxed)) return compress_shani(st, blocks, nblocks);
#endif
    compress_portable(st, blocks, nblocks);
}

// SHA256(prefix || data) for any length: full blocks straight from `data`, the tail padded on the stack.
void hash_prefixed(const uint8_t* prefix, size_t plen, const uint8_t* data, size_t len, uint8_t out[32]) {
    const uint64_t total = uint64_t(plen) + len;
    if (total <= 55) {  // one block
        alignas(16) uint8_t blk[64] = {0};
        std::memcpy(blk, prefix, plen);
        if (len) std::memcpy(blk + plen, data, len);
        blk[total] = 0x80;
        const uint64_t bits = total * 8;
        for (int i = 0; i < 8; ++i) blk[63 - i] = uint8_t(bits >> (8 * i));
        return digest_blocks(blk, 1, out);
    }
    uint32_t st[8];
    std::memcpy(st, kInit, sizeof st);
    alignas(16) uint8_t buf[128];
    // First block: prefix + the start of data (plen < 64 is guaranteed by callers).
    size_t fill = plen;
    std::memcpy(buf, prefix, plen);
    size_t take = std::min<size_t>(64 - fill, len);
    if (take) std::memcpy(buf + fill, data, take);
    fill += take;
    data += take;
    len -= take;
    if (fill == 64) {
        compress_any(st, buf, 1);
        fill = 0;
        const size_t full = len / 64;
        if (full) compress_any(st, data, full);
        data += 64 * full;
        len -= 64 * full;
        if (len) std::memcpy(buf, data, len);
        fill = len;
    }
    // Padding: 0x80, zeros, 64-bit big-endian bit length.
    buf[fill++] = 0x80;
    const size_t padded = fill <= 56 ? 64 : 128;
    std::memset(buf + fill, 0, padded - fill);
    const uint64_t bits = total * 8;
    for (int i = 0; i < 8; ++i) buf[padded - 1 - i] = uint8_t(bits >> (8 * i));
    compress_any(st, buf, padded / 64);
    for (int i = 0; i < 8; ++i) store_be32(out + 4 * i, st[i]);
}

// 0x01 || left || right || LE32(count), padded to two blocks (69 bytes = 552 bits).
inline void node_message(const uint8_t l[32], const uint8_t r[32], uint32_t count, uint8_t m[128]) {
    m[0] = 0x01;
    std::memcpy(m + 1, l, 32);
    std::memcpy(m + 33, r, 32);
    m[65] = uint8_t(count); m[66] = uint8_t(count >> 8); m[67] = uint8_t(count >> 16); m[68] = uint8_t(count >> 24);
    m[69] = 0x80;
    std::memset(m + 70, 0, 56);
    m[126] = 0x02;  // 552 = 0x0228
    m[127] = 0x28;
}

// One padded block of SHA256(0x00 || LE32(nonce) || vector); needs 5 + len <= 55, i.e. len <= 50.
inline void leaf_block(uint32_t nonce, const uint8_t* vector, size_t len, uint8_t blk[64]) {
    std::memset(blk, 0, 64);
    blk[1] = uint8_t(nonce); blk[2] = uint8_t(nonce >> 8); blk[3] = uint8_t(nonce >> 16); blk[4] = uint8_t(nonce >> 24);
    std::memcpy(blk + 5, vector, len);
    const uint64_t total = 5 + len;
    blk[total] = 0x80;
    const uint64_t bits = total * 8;
    for (int i = 0; i < 8; ++i) blk[63 - i] = uint8_t(bits >> (8 * i));
}

}  // namespace

const char* backend() { return g_use_shani.load() ? "sha-ni" : "portable"; }
bool shani_available() { return kShaniAvailable; }

bool set_backend(const char* name) {
    const std::string n(name);
    if (n == "portable") { g_use_shani = false; return true; }
    if (n == "sha-ni" || n == "auto") {
        if (!kShaniAvailable) { g_use_shani = false; return n == "auto"; }
        g_use_shani = true;
        return true;
    }
    return false;
}

void sha256(const uint8_t* data, size_t len, uint8_t out[32]) { hash_prefixed(nullptr, 0, data, len, out); }

void leaf_hash(const uint8_t* leaf_data, size_t len, uint8_t out[32]) {
    const uint8_t prefix = 0x00;
    hash_prefixed(&prefix, 1, leaf_data, len, out);
}

void leaf_hash_parts(uint32_t nonce, const uint8_t* vector, size_t len, uint8_t out[32]) {
    const uint8_t prefix[5] = {0x00, uint8_t(nonce), uint8_t(nonce >> 8), uint8_t(nonce >> 16), uint8_t(nonce >> 24)};
    hash_prefixed(prefix, 5, vector, len, out);
}

void node_hash(const uint8_t left[32], const uint8_t right[32], uint32_t count, uint8_t out[32]) {
    alignas(16) uint8_t m[128];
    node_message(left, right, count, m);
    digest_blocks(m, 2, out);
}

void node_hash_x2(const uint8_t l0[32], const uint8_t r0[32], uint32_t c0, uint8_t out0[32],
                  const uint8_t l1[32], const uint8_t r1[32], uint32_t c1, uint8_t out1[32]) {
    alignas(16) uint8_t m0[128], m1[128];
    node_message(l0, r0, c0, m0);
    node_message(l1, r1, c1, m1);
#if CPOC_HAVE_X86
    if (g_use_shani.load(std::memory_order_relaxed)) return digest2_shani_x2(m0, m1, out0, out1);
#endif
    digest_portable(m0, 2, out0);
    digest_portable(m1, 2, out1);
}

void node_hash_batch(const NodeJob* jobs, size_t n) {
    size_t i = 0;
#if CPOC_HAVE_X86
    if (g_use_shani.load(std::memory_order_relaxed)) {
        alignas(16) uint8_t m[4][128];
        for (; i + 4 <= n; i += 4) {
            const uint8_t* msgs[4];
            uint8_t* outs[4];
            for (int j = 0; j < 4; ++j) {
                const NodeJob& b = jobs[i + j];
                node_message(b.left, b.right, b.count, m[j]);
                msgs[j] = m[j];
                outs[j] = b.out;
            }
            digest_shani_x4(msgs, 2, outs);
        }
    }
#endif
    for (; i < n; ++i) node_hash(jobs[i].left, jobs[i].right, jobs[i].count, jobs[i].out);
}

void leaf_hash_batch(const LeafJob* jobs, size_t n) {
    size_t i = 0;
#if CPOC_HAVE_X86
    if (g_use_shani.load(std::memory_order_relaxed)) {
        alignas(16) uint8_t m[4][64];
        while (i + 4 <= n) {
            bool one_block = true;
            for (int j = 0; j < 4; ++j) one_block = one_block && jobs[i + j].len <= 50;
            if (!one_block) {
                leaf_hash_parts(jobs[i].nonce, jobs[i].vector, jobs[i].len, jobs[i].out);
                ++i;
                continue;
            }
            const uint8_t* msgs[4];
            uint8_t* outs[4];
            for (int j = 0; j < 4; ++j) {
                const LeafJob& b = jobs[i + j];
                leaf_block(b.nonce, b.vector, b.len, m[j]);
                msgs[j] = m[j];
                outs[j] = b.out;
            }
            digest_shani_x4(msgs, 1, outs);
            i += 4;
        }
    }
#endif
    for (; i < n; ++i) leaf_hash_parts(jobs[i].nonce, jobs[i].vector, jobs[i].len, jobs[i].out);
}

}  // namespace cpoc::sha
