"""cpoc_kernels: Gonka PoC v2 nonces computed inside live inference batches ("continuous PoC")."""
__version__ = "0.1.0"
