// Batch SMST hashes for the artifact store's own tree bookkeeping (cpoc_kernels/merkle/store_index.py).
// Inputs are copied before the GIL is released, so another thread changing them cannot tear a result.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "sha256.h"

namespace py = pybind11;

namespace {

template <typename T>
std::vector<T> copy_of(const py::array_t<T, py::array::c_style | py::array::forcecast>& a) {
    return std::vector<T>(a.data(), a.data() + a.size());
}

}  // namespace

void init_store_hash(py::module_& m) {
    m.def(
        "smst_leaf_hashes",
        [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> nonces,
           py::array_t<uint8_t, py::array::c_style | py::array::forcecast> vectors) {
            if (nonces.ndim() != 1 || vectors.ndim() != 2 || nonces.shape(0) != vectors.shape(0))
                throw std::invalid_argument("expected nonces int32 [n] and vectors uint8 [n, L]");
            const size_t n = size_t(nonces.shape(0)), len = size_t(vectors.shape(1));
            if (len == 0 && n) throw std::invalid_argument("empty vectors");
            std::vector<int32_t> nc = copy_of(nonces);
            std::vector<uint8_t> vc = copy_of(vectors);
            py::array_t<uint8_t> out({py::ssize_t(n), py::ssize_t(32)});
            uint8_t* o = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                for (size_t i = 0; i < n; ++i)
                    cpoc::sha::leaf_hash_parts(uint32_t(nc[i]), vc.data() + i * len, len, o + 32 * i);
            }
            return out;
        },
        py::arg("nonces"), py::arg("vectors"), "SHA256(0x00 || LE32(nonce) || vector) per row: uint8 [n, 32].");
    m.def(
        "smst_node_hashes",
        [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> left,
           py::array_t<uint8_t, py::array::c_style | py::array::forcecast> right,
           py::array_t<uint32_t, py::array::c_style | py::array::forcecast> counts) {
            if (left.ndim() != 2 || right.ndim() != 2 || counts.ndim() != 1 || left.shape(1) != 32 ||
                right.shape(1) != 32 || left.shape(0) != right.shape(0) || left.shape(0) != counts.shape(0))
                throw std::invalid_argument("expected left, right uint8 [m, 32] and counts uint32 [m]");
            const size_t n = size_t(counts.shape(0));
            std::vector<uint8_t> lc = copy_of(left), rc = copy_of(right);
            std::vector<uint32_t> cc = copy_of(counts);
            py::array_t<uint8_t> out({py::ssize_t(n), py::ssize_t(32)});
            uint8_t* o = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                size_t i = 0;
                for (; i + 1 < n; i += 2)
                    cpoc::sha::node_hash_x2(lc.data() + 32 * i, rc.data() + 32 * i, cc[i], o + 32 * i,
                                            lc.data() + 32 * (i + 1), rc.data() + 32 * (i + 1), cc[i + 1],
                                            o + 32 * (i + 1));
                if (i < n) cpoc::sha::node_hash(lc.data() + 32 * i, rc.data() + 32 * i, cc[i], o + 32 * i);
            }
            return out;
        },
        py::arg("left"), py::arg("right"), py::arg("counts"),
        "SHA256(0x01 || left || right || LE32(count)) per row: uint8 [m, 32].");
}
