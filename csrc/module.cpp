// The one native extension, cpoc_kernels._C. Each op family registers itself here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_rng(py::module_& m);     // rng.cpp: murmur variant, uniform, split-halves Box-Muller
void init_merkle(py::module_& m);  // merkle_bindings.cpp: SHA-256, SMST commitment, proofs
void init_store_hash(py::module_& m);  // store_hash.cpp: batch leaf/node hashes for the artifact store

PYBIND11_MODULE(_C, m) {
    m.doc() = "cpoc_kernels native CPU core (RNG primitives, SMST commitment)";
    init_rng(m);
    init_merkle(m);
    init_store_hash(m);
}
