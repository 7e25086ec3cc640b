"""Fused PoC ops (Triton on CUDA, C++/torch on CPU), registered as ``torch.ops.cpoc.*``."""
from .inputs import poc_inputs

__all__ = ["poc_inputs"]
