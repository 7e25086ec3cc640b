"""Normative plain-torch reference of PoC v2 (spec ``pocv2_algorithm.md``). Imports nothing of ours.

Every kernel in ``cpoc_kernels.ops`` is tested against these functions.
"""
from .codec import decode_payload, decode_vector, encode_vector, vector_bytes
from .householder import layer_vector, reflect
from .inputs import nonce_normals, poc_inputs
from .nonces import NonceIterator
from .readout import K_DIM, UNIT_TOL, haar_vectors, is_emittable, output_stage, pick_indices, rotate_picked
from .rng import mmh, normal, stronger_normal, uniform
from .seeds import seed32

__all__ = [
    "K_DIM",
    "UNIT_TOL",
    "NonceIterator",
    "decode_payload",
    "decode_vector",
    "encode_vector",
    "haar_vectors",
    "is_emittable",
    "layer_vector",
    "mmh",
    "nonce_normals",
    "normal",
    "output_stage",
    "pick_indices",
    "poc_inputs",
    "reflect",
    "rotate_picked",
    "seed32",
    "stronger_normal",
    "uniform",
    "vector_bytes",
]
