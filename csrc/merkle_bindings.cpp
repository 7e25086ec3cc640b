// pybind11 bindings of the SHA-256 + SMST core (csrc/sha256.*, csrc/smst.*). Bulk work releases the GIL.
// Nonces cross this boundary as int32 values (bitwise uint32 inside); counts and indices as uint64.
//
// Rule for every binding that releases the GIL: whatever the C++ side checks and then uses again
// (nonces checked for duplicates, indices checked against the count) is copied into memory that no
// other thread can reach before the GIL is released. A caller's numpy buffer may be changed by
// another Python thread, or alias the output (`proofs(idx, out=idx.view(...))`), the moment the GIL
// is gone. Buffers read exactly once and never used as indices (vector bytes, proofs and leaf data
// to verify) are read in place: a concurrent change can only change that call's answer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "sha256.h"
#include "smst.h"

namespace py = pybind11;
using cpoc::smst::Smst;

namespace {

uint32_t nonce_bits(int64_t nonce) {
    if (nonce < -2147483648LL || nonce > 2147483647LL)
        throw std::invalid_argument("nonce " + std::to_string(nonce) + " is not an int32");
    return uint32_t(int32_t(nonce));
}

uint64_t as_count(int64_t v, const char* what) {
    if (v < 0) throw std::invalid_argument(std::string(what) + " must be >= 0, got " + std::to_string(v));
    return uint64_t(v);
}

template <class T, class A>
std::vector<T> copy_of(const A& arr) {
    const T* p = reinterpret_cast<const T*>(arr.data());
    return std::vector<T>(p, p + arr.size());
}

std::string_view bytes_view(const py::bytes& b) {
    char* p = nullptr;
    Py_ssize_t n = 0;
    if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
    return {p, size_t(n)};
}

py::bytes hash_bytes(const cpoc::smst::Hash& h) { return py::bytes(reinterpret_cast<const char*>(h.data()), 32); }

const uint8_t* u8(std::string_view s) { return reinterpret_cast<const uint8_t*>(s.data()); }

void need_hash32(std::string_view s, const char* what) {
    if (s.size() != 32)
        throw std::invalid_argument(std::string(what) + " must be 32 bytes, got " + std::to_string(s.size()));
}

}  // namespace

void init_merkle(py::module_& m) {
    py::register_exception<cpoc::smst::SnapshotNotFound>(m, "SmstSnapshotNotFound", PyExc_KeyError);

    m.def("smst_set_threads", &cpoc::smst::set_max_threads, py::arg("n"),
          "Threads the SMST's bulk build and proofs may use (process-wide; results never depend on it).");
    m.def("smst_threads", &cpoc::smst::max_threads);
    m.def("sha256_backend", &cpoc::sha::backend, "SHA-256 backend in use: 'sha-ni' or 'portable'.");
    m.def("sha256_shani_available", &cpoc::sha::shani_available, "True if this CPU has the SHA extensions.");
    m.def(
        "sha256_set_backend", [](const std::string& name) { return cpoc::sha::set_backend(name.c_str()); },
        py::arg("name"), "Select 'sha-ni', 'portable' or 'auto' (process-wide); False if not possible.");
    m.def(
        "sha256",
        [](const py::bytes& data) {
            auto v = bytes_view(data);
            uint8_t out[32];
            {
                py::gil_scoped_release nogil;
                cpoc::sha::sha256(u8(v), v.size(), out);
            }
            return py::bytes(reinterpret_cast<const char*>(out), 32);
        },
        py::arg("data"), "SHA-256 digest (32 bytes).");
    m.def(
        "smst_leaf_hash",
        [](const py::bytes& leaf_data) {
            auto v = bytes_view(leaf_data);
            uint8_t out[32];
            cpoc::sha::leaf_hash(u8(v), v.size(), out);
            return py::bytes(reinterpret_cast<const char*>(out), 32);
        },
        py::arg("leaf_data"), "SHA256(0x00 || leaf_data).");
    m.def(
        "smst_node_hash",
        [](const py::bytes& left, const py::bytes& right, int64_t count) {
            auto l = bytes_view(left), r = bytes_view(right);
            need_hash32(l, "left");
            need_hash32(r, "right");
            if (count < 0 || count > 0xFFFFFFFFLL) throw std::invalid_argument("count must be a uint32");
            uint8_t out[32];
            cpoc::sha::node_hash(u8(l), u8(r), uint32_t(count), out);
            return py::bytes(reinterpret_cast<const char*>(out), 32);
        },
        py::arg("left"), py::arg("right"), py::arg("count"), "SHA256(0x01 || left || right || LE32(count)).");
    m.def(
        "smst_empty_hashes",
        []() {
            py::list out;
            for (int h = 0; h <= cpoc::smst::kMaxDepth; ++h) out.append(hash_bytes(cpoc::smst::empty_hash(h)));
            return out;
        },
        "E[0..32].");
    m.def("smst_verify_reason", &cpoc::smst::verify_reason, py::arg("code"));
    m.def(
        "smst_verify",
        [](const py::bytes& root, int64_t count, int64_t dense_index, int64_t nonce, const py::bytes& leaf_data,
           const py::list& proof) {
            auto r = bytes_view(root);
            need_hash32(r, "root");
            const uint32_t nb = nonce_bits(nonce);
            auto ld = bytes_view(leaf_data);
            std::string flat;
            std::vector<size_t> sizes;
            sizes.reserve(proof.size());
            for (py::handle e : proof) {
                if (!PyBytes_Check(e.ptr())) throw py::type_error("proof elements must be bytes");
                auto v = bytes_view(py::reinterpret_borrow<py::bytes>(e));
                sizes.push_back(v.size());
                if (v.size() == cpoc::smst::kProofElementSize) flat.append(v);
                else flat.append(cpoc::smst::kProofElementSize, '\0');
            }
            py::gil_scoped_release nogil;
            return cpoc::smst::verify(u8(r), as_count(count, "count"), as_count(dense_index, "dense_index"), nb,
                                      u8(ld), ld.size(), u8(flat), sizes.size(), sizes.data());
        },
        py::arg("root"), py::arg("count"), py::arg("dense_index"), py::arg("nonce"), py::arg("leaf_data"),
        py::arg("proof"), "VerifySMSTProofWithDenseIndex; returns a code (0 = valid, see smst_verify_reason).");
    m.def(
        "smst_verify_many",
        [](const py::bytes& root, int64_t count, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> dense,
           py::array_t<int32_t, py::array::c_style | py::array::forcecast> nonces,
           py::array_t<uint8_t, py::array::c_style | py::array::forcecast> leaf_data,
           py::array_t<uint8_t, py::array::c_style | py::array::forcecast> proofs) {
            auto r = bytes_view(root);
            need_hash32(r, "root");
            const uint64_t c = as_count(count, "count");
            if (dense.ndim() != 1 || nonces.ndim() != 1 || leaf_data.ndim() != 2 || proofs.ndim() != 3)
                throw std::invalid_argument("expected dense[n], nonces[n], leaf_data[n, L], proofs[n, D, 36]");
            const size_t n = size_t(dense.shape(0));
            if (size_t(nonces.shape(0)) != n || size_t(leaf_data.shape(0)) != n || size_t(proofs.shape(0)) != n)
                throw std::invalid_argument("dense, nonces, leaf_data and proofs must have the same length");
            if (proofs.shape(2) != 36) throw std::invalid_argument("proof elements must be 36 bytes");
            py::array_t<int32_t> codes{py::ssize_t(n)};
            int* out = codes.mutable_data();
            const size_t leaf_len = size_t(leaf_data.shape(1)), depth = size_t(proofs.shape(1));
            const std::vector<uint64_t> own_dense = copy_of<uint64_t>(dense);
            const std::vector<uint32_t> own_nonces = copy_of<uint32_t>(nonces);
            {
                py::gil_scoped_release nogil;
                cpoc::smst::verify_many(u8(r), c, n, own_dense.data(), own_nonces.data(), leaf_data.data(), leaf_len,
                                        proofs.data(), depth, out);
            }
            return codes;
        },
        py::arg("root"), py::arg("count"), py::arg("dense_indices"), py::arg("nonces"), py::arg("leaf_data"),
        py::arg("proofs"), "Verifies n proofs against one (root, count); returns int32 codes [n] (0 = valid).");

    py::class_<Smst>(m, "Smst", "SMST keyed by nonce (chain v0.2.14 bytes). Use cpoc_kernels.merkle.SMST.")
        .def(py::init<>())
        .def(
            "insert",
            [](Smst& s, int64_t nonce, const py::bytes& vector) {
                const uint32_t nb = nonce_bits(nonce);
                auto v = bytes_view(vector);
                py::gil_scoped_release nogil;
                s.insert(nb, u8(v), v.size());
            },
            py::arg("nonce"), py::arg("vector"))
        .def(
            "extend",
            [](Smst& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast> nonces,
               const py::list& vectors) {
                if (nonces.ndim() != 1 || size_t(nonces.shape(0)) != vectors.size())
                    throw std::invalid_argument("nonces and vectors must have the same length");
                std::vector<py::bytes> keep;
                keep.reserve(vectors.size());
                std::vector<const uint8_t*> ptrs;
                std::vector<size_t> lens;
                for (py::handle v : vectors) {
                    if (!PyBytes_Check(v.ptr())) throw py::type_error("vectors must be bytes");
                    keep.push_back(py::reinterpret_borrow<py::bytes>(v));
                    auto sv = bytes_view(keep.back());
                    ptrs.push_back(u8(sv));
                    lens.push_back(sv.size());
                }
                const std::vector<uint32_t> own = copy_of<uint32_t>(nonces);  // checked, then inserted
                py::gil_scoped_release nogil;
                s.extend(lens.size(), own.data(), ptrs.data(), lens.data());
            },
            py::arg("nonces"), py::arg("vectors"), "All-or-nothing batch insert (list of bytes vectors).")
        .def(
            "extend_fixed",
            [](Smst& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast> nonces,
               py::array_t<uint8_t, py::array::c_style | py::array::forcecast> vectors) {
                if (nonces.ndim() != 1 || vectors.ndim() != 2 || nonces.shape(0) != vectors.shape(0))
                    throw std::invalid_argument("expected nonces int32 [n] and vectors uint8 [n, L]");
                const std::vector<uint32_t> own = copy_of<uint32_t>(nonces);  // checked, then inserted
                py::gil_scoped_release nogil;
                s.extend_fixed(own.size(), own.data(), vectors.data(), size_t(vectors.shape(1)));
            },
            py::arg("nonces"), py::arg("vectors"), "All-or-nothing batch insert of fixed-length vectors.")
        .def_property_readonly("count", &Smst::count)
        .def_property_readonly("depth", &Smst::depth)
        .def("contains", [](const Smst& s, int64_t nonce) { return s.contains(nonce_bits(nonce)); })
        .def(
            "root_at",
            [](Smst& s, int64_t count) {
                const uint64_t c = as_count(count, "count");
                cpoc::smst::Hash h;
                {
                    py::gil_scoped_release nogil;
                    h = s.root_at(c);
                }
                return hash_bytes(h);
            },
            py::arg("count") = 0, "Root of the snapshot at count (0 = current tree).")
        .def(
            "roots_at",
            [](Smst& s, const std::vector<int64_t>& counts) {
                std::vector<uint64_t> c;
                c.reserve(counts.size());
                for (int64_t v : counts) c.push_back(as_count(v, "count"));
                std::vector<cpoc::smst::Hash> roots;
                {
                    py::gil_scoped_release nogil;
                    roots = s.roots_at(c);
                }
                py::list out;
                for (const auto& h : roots) out.append(hash_bytes(h));
                return out;
            },
            py::arg("counts"), "Roots of the snapshots at each count (list of 32-byte roots).")
        .def(
            "depth_at",
            [](Smst& s, int64_t count) {
                const uint64_t c = as_count(count, "count");
                py::gil_scoped_release nogil;
                return s.depth_at(c);
            },
            py::arg("count") = 0)
        .def(
            "proof",
            [](Smst& s, int64_t dense_index, int64_t count) {
                const uint64_t d = as_count(dense_index, "dense_index"), c = as_count(count, "count");
                std::string p;
                {
                    py::gil_scoped_release nogil;
                    p = s.proof(d, c);
                }
                return py::bytes(p);
            },
            py::arg("dense_index"), py::arg("count") = 0, "depth * 36 proof bytes, root -> leaf.")
        .def(
            "proofs",
            [](Smst& s, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> dense, int64_t count,
               std::optional<py::array_t<uint8_t, py::array::c_style>> out_arg) {
                // Pin the count first: a snapshot at a fixed count never changes, so depth and proofs agree
                // even if another thread inserts meanwhile.
                uint64_t c = as_count(count, "count");
                if (c == 0) c = s.count();
                if (dense.ndim() != 1) throw std::invalid_argument("dense_indices must be 1-D");
                int depth;
                {
                    py::gil_scoped_release nogil;
                    depth = s.depth_at(c);
                }
                const size_t n = size_t(dense.shape(0));
                py::array_t<uint8_t, py::array::c_style> out;
                if (out_arg) {
                    out = *out_arg;
                    const bool ok = out.ndim() == 3 && size_t(out.shape(0)) == n && out.shape(1) == depth &&
                                    out.shape(2) == 36 && (out.flags() & py::array::c_style) && out.writeable();
                    if (!ok)
                        throw std::invalid_argument("out must be a writable C-contiguous uint8 array of shape (" +
                                                    std::to_string(n) + ", " + std::to_string(depth) + ", 36)");
                } else {
                    out = py::array_t<uint8_t, py::array::c_style>({py::ssize_t(n), py::ssize_t(depth), py::ssize_t(36)});
                }
                const std::vector<uint64_t> own = copy_of<uint64_t>(dense);  // checked, then used as indices
                uint8_t* o = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    s.proofs(n, own.data(), c, o);
                }
                return out;
            },
            py::arg("dense_indices"), py::arg("count") = 0, py::arg("out").noconvert() = py::none(),
            "uint8 [n, depth, 36] proofs (written into `out` when given).")
        .def(
            "artifact",
            [](Smst& s, int64_t dense_index, int64_t count) {
                const uint64_t d = as_count(dense_index, "dense_index"), c = as_count(count, "count");
                std::pair<uint32_t, std::string> a;
                {
                    py::gil_scoped_release nogil;
                    a = s.artifact(d, c);
                }
                return py::make_tuple(int32_t(a.first), py::bytes(a.second));
            },
            py::arg("dense_index"), py::arg("count") = 0, "(nonce, vector) at dense_index.")
        .def(
            "artifacts",
            [](Smst& s, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> dense, int64_t count) {
                if (dense.ndim() != 1) throw std::invalid_argument("dense_indices must be 1-D");
                const uint64_t c = as_count(count, "count");
                const std::vector<uint64_t> own = copy_of<uint64_t>(dense);
                std::vector<uint32_t> arr(own.size());
                {
                    py::gil_scoped_release nogil;
                    s.arrivals(own.size(), own.data(), c, arr.data());
                }
                py::array_t<int32_t> nonces{py::ssize_t(own.size())};
                py::list vectors;
                int32_t* np = nonces.mutable_data();
                for (size_t i = 0; i < arr.size(); ++i) {
                    auto leaf = s.arrival_leaf(arr[i]);
                    np[i] = int32_t(leaf.first);
                    vectors.append(py::bytes(leaf.second));
                }
                return py::make_tuple(nonces, vectors);
            },
            py::arg("dense_indices"), py::arg("count") = 0, "(nonces int32 [n], list of vectors) at dense indices.")
        .def_property_readonly("memory_bytes", &Smst::memory_bytes)
        .def(
            "arrival_leaf",
            [](const Smst& s, int64_t i) {
                auto a = s.arrival_leaf(as_count(i, "arrival_index"));
                return py::make_tuple(int32_t(a.first), py::bytes(a.second));
            },
            py::arg("arrival_index"), "(nonce, vector) of the i-th inserted leaf.");
}
