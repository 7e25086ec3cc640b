"""Fused PoC ops (Triton on CUDA, C++/torch on CPU), registered as ``torch.ops.cpoc.*``.

Python entry points (each with ``backend="auto"|"triton"|"torch"``; auto = Triton on CUDA, C++/torch on CPU):

* ``poc_inputs(block_hash, public_key, nonces, seq_len, hidden, dtype, device=None, stronger_rng=False,
  out=None, row_offset=0)`` -> ``[B, S, H]`` (or ``out`` written in place at ``row_offset + b*S + t``);
* ``masked_reflect_(hidden, residual, v, rows)`` -> in place on the selected rows of both tensors (a bool
  ``rows`` mask goes to ``masked_reflect_rows_mask_(hidden, residual, v, row_mask)``: bool/uint8 [N], no host sync);
* ``poc_readout(hs, block_hash, public_key, nonces, k=12)`` -> ``ReadoutResult(vectors, emittable, payloads)``.

Raw custom ops (tensor arguments only; host SHA-256/picks done by the wrappers, usable under
``torch.compile(fullgraph=True)`` and CUDA graphs): ``torch.ops.cpoc.poc_inputs_(out, seeds, seq_len,
row_offset)``, ``torch.ops.cpoc.masked_reflect_(hidden, residual, v, rows)``,
``torch.ops.cpoc.masked_reflect_rows_mask_(hidden, residual, v, row_mask)`` (launch grid fixed by the shape: the
mask content may change between CUDA-graph replays),
``torch.ops.cpoc.poc_readout(hs, idx, haar_normals)``. Exactness is stated in each module's docstring.
"""
from .inputs import poc_inputs
from .readout import ReadoutResult, poc_readout
from .reflect import masked_reflect_, masked_reflect_rows_mask_

__all__ = ["ReadoutResult", "masked_reflect_", "masked_reflect_rows_mask_", "poc_inputs", "poc_readout"]
