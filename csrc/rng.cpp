// PoC v2 integer RNG primitives on the CPU (spec pocv2_algorithm.md §3).
//
// Exactness: mmh and uniform are bit-exact. normal() uses the C library's logf/cosf/sinf, so its
// fp32 values are within a few ulp of torch's (torch's CPU kernels use SLEEF, CUDA uses libdevice);
// the op order and the fp32 rounding points are those of the reference (no FMA contraction).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

// One 4-byte Murmur3 block, no tail and no length mixing (spec §3.2).
inline uint32_t mmh(uint32_t key, uint32_t seed) {
    uint32_t k = key * 0xCC9E2D51u;
    k = rotl32(k, 15);
    k *= 0x1B873593u;
    uint32_t h = seed ^ k;
    h = rotl32(h, 13);
    h = h * 5u + 0xE6546B64u;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

// fp32(mmh) / 2^32: uint32 -> fp32 rounds to nearest even, the division by 2^32 is exact.
inline float uniform_at(uint32_t key, uint32_t seed) {
    return static_cast<float>(mmh(key, seed)) * (1.0f / 4294967296.0f);
}

// normal(seed, n) written into out[0:n] (split halves: first P use cos, next P use sin).
void normal_fill(float* out, int64_t n, uint32_t seed) {
    const int64_t P = (n + 1) / 2;
    const float two_pi = 6.2831855f;
    const float clamp = 1e-10f;
    for (int64_t i = 0; i < P; ++i) {
        float u1 = uniform_at(static_cast<uint32_t>(i), seed);
        float u2 = uniform_at(static_cast<uint32_t>(P + i), seed);
        u1 = std::max(u1, clamp);
        // Each line rounds once to fp32 (built with -ffp-contract=off, SSE fp32 arithmetic).
        const float r = std::sqrt(-2.0f * std::log(u1));
        const float a = two_pi * u2;
        out[i] = r * std::cos(a);
        if (P + i < n) out[P + i] = r * std::sin(a);
    }
}

template <typename T>
T* writable_1d(py::array_t<T, py::array::c_style>& arr, const char* what) {
    if (arr.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
    return arr.mutable_data();
}

uint32_t as_seed(int64_t seed) {
    if (seed < 0 || seed > 0xFFFFFFFFll) throw std::invalid_argument("seed must be a uint32 (0 <= seed < 2**32)");
    return static_cast<uint32_t>(seed);
}

}  // namespace

void init_rng(py::module_& m) {
    m.def(
        "mmh_range",
        [](int64_t seed, int64_t start, int64_t n) {
            uint32_t s = as_seed(seed);
            if (n < 0) throw std::invalid_argument("n must be >= 0");
            py::array_t<uint32_t> out(n);
            uint32_t* o = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                for (int64_t i = 0; i < n; ++i) o[i] = mmh(static_cast<uint32_t>(start + i), s);
            }
            return out;
        },
        py::arg("seed"), py::arg("start"), py::arg("n"),
        "mmh(start + i, seed) for i < n as uint32 (keys wrap mod 2**32). Bit-exact.");
    m.def(
        "uniform",
        [](int64_t seed, int64_t n) {
            uint32_t s = as_seed(seed);
            if (n < 0) throw std::invalid_argument("n must be >= 0");
            py::array_t<float> out(n);
            float* o = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                for (int64_t i = 0; i < n; ++i) o[i] = uniform_at(static_cast<uint32_t>(i), s);
            }
            return out;
        },
        py::arg("seed"), py::arg("n"), "fp32(mmh(i, seed)) / 2**32 for i < n. Bit-exact.");
    m.def(
        "normal_into",
        [](py::array_t<float, py::array::c_style> out, int64_t seed) {
            uint32_t s = as_seed(seed);
            float* o = writable_1d(out, "out");
            int64_t n = out.shape(0);
            py::gil_scoped_release nogil;
            normal_fill(o, n, s);
        },
        py::arg("out").noconvert(), py::arg("seed"),
        "Writes normal(seed, len(out)) into the contiguous fp32 array `out` (split-halves Box-Muller).");
}
