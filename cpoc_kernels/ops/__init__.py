"""Fused PoC ops (Triton on CUDA, C++/torch on CPU), registered as ``torch.ops.cpoc.*``."""
from .inputs import poc_inputs
from .readout import ReadoutResult, poc_readout
from .reflect import masked_reflect_

__all__ = ["ReadoutResult", "masked_reflect_", "poc_inputs", "poc_readout"]
