"""Fused PoC ops (Triton on CUDA, C++/torch on CPU), registered as ``torch.ops.cpoc.*``."""
from .inputs import poc_inputs
from .reflect import masked_reflect_

__all__ = ["masked_reflect_", "poc_inputs"]
