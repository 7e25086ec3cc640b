// SHA-256 for the SMST commitment (spec pocv2_protocol.md §1.3).
//
// Two compression backends with identical output: x86 SHA extensions (SHA-NI, chosen at run time
// when the CPU has them) and a portable C++ fallback. All functions are bit-exact FIPS 180-4.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cpoc::sha {

// "sha-ni" or "portable": the backend the functions below use now.
const char* backend();
// True when this CPU (and this build) supports the SHA-NI backend.
bool shani_available();
// Selects "sha-ni" (only if available) or "portable"; "auto" picks the fastest. Returns false if refused.
bool set_backend(const char* name);

// SHA256(data[0:len]) -> out[32].
void sha256(const uint8_t* data, size_t len, uint8_t out[32]);
// SMST leaf hash: SHA256(0x00 || leaf_data).
void leaf_hash(const uint8_t* leaf_data, size_t len, uint8_t out[32]);
// SMST leaf hash of LE32(nonce) || vector (no copy of the leaf data needed by the caller).
void leaf_hash_parts(uint32_t nonce, const uint8_t* vector, size_t len, uint8_t out[32]);
// SMST internal node: SHA256(0x01 || left || right || LE32(count)).
void node_hash(const uint8_t left[32], const uint8_t right[32], uint32_t count, uint8_t out[32]);
// Two independent node hashes at once (interleaved so SHA-NI latency overlaps); same results as two calls.
void node_hash_x2(const uint8_t l0[32], const uint8_t r0[32], uint32_t c0, uint8_t out0[32],
                  const uint8_t l1[32], const uint8_t r1[32], uint32_t c1, uint8_t out1[32]);

// One independent node hash of a batch: out = node(left, right, count). out may alias left or right.
struct NodeJob {
    const uint8_t* left;
    const uint8_t* right;
    uint32_t count;
    uint8_t* out;
};
// Hashes jobs[0..n) (four messages interleaved with SHA-NI); same bytes as n node_hash calls.
void node_hash_batch(const NodeJob* jobs, size_t n);

// One leaf hash of a batch: out = SHA256(0x00 || LE32(nonce) || vector[0:len]).
struct LeafJob {
    uint32_t nonce;
    const uint8_t* vector;
    size_t len;
    uint8_t* out;
};
// Hashes jobs[0..n); one-block leaves (len <= 50) four at a time with SHA-NI; same bytes as leaf_hash_parts.
void leaf_hash_batch(const LeafJob* jobs, size_t n);

}  // namespace cpoc::sha
