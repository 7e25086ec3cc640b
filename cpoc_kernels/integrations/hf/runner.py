"""Pure-PoC runner on any HF causal LM whose decoder layers sit at ``model.model.layers``.

Per batch of nonces: seeded input embeddings go in through ``inputs_embeds`` (the token embedding is
bypassed), positions are 0..S−1 per nonce, every decoder layer's output is reflected with the
round's Householder vector, and the last token's final-norm hidden state goes through the output
stage. Rows with NaN are dropped (spec §5.4). This is also what a validator runs to recompute.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch

from cpoc_kernels import ops
from cpoc_kernels.artifacts import Artifact, check_nonce
from cpoc_kernels.reference.householder import layer_vector
from cpoc_kernels.reference.readout import K_DIM

ProgressCallback = Callable[[int, int], None]  # (nonces done, nonces total)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers at ``model.model.layers``; a model without them → ValueError (never silently unhooked)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def _reflect_output(output, v: torch.Tensor):
    """Reflect a layer's output: the tensor itself, or element 0 of a tuple (the HF residual stream)."""
    if isinstance(output, torch.Tensor):
        hidden = output.contiguous().clone()
        flat = hidden.view(-1, hidden.shape[-1])
        every_row = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)  # mask path: no host sync
        ops.masked_reflect_(flat, None, v, every_row)
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (_reflect_output(output[0], v),) + tuple(output[1:])
    raise TypeError(f"decoder layer returned {type(output).__name__}; expected a tensor or a tuple")


@contextlib.contextmanager
def reflection_hooks(layers: Sequence[torch.nn.Module], vectors: Sequence[torch.Tensor]):
    """Forward hooks that reflect every row of layer i's output with vectors[i], removed on exit."""
    handles = [
        layer.register_forward_hook(lambda _m, _args, out, v=v: _reflect_output(out, v))
        for layer, v in zip(layers, vectors, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def readout_vectors(hs: torch.Tensor, block_hash: str, public_key: str, nonces: Sequence[int],
                    k: int = K_DIM) -> tuple[list[int], torch.Tensor]:
    """(kept nonces, fp16 vectors [B', k] on the CPU) from last-token hidden states [B, H]; rows that are not
    emittable (NaN/Inf in hs or after the fp16 cast, spec §5.4) are dropped."""
    result = ops.poc_readout(hs, block_hash, public_key, list(nonces), k=k)
    keep = result.emittable.to(device="cpu", dtype=torch.bool)
    return [n for n, ok in zip(nonces, keep.tolist()) if ok], result.vectors.cpu()[keep]


class PoCRunner:
    """Computes PoC v2 artifacts for nonces on one model (fixed round: block hash, public key, seq_len, k)."""

    def __init__(
        self,
        model: torch.nn.Module,
        block_hash: str,
        public_key: str,
        seq_len: int,
        k: int = K_DIM,
        batch_size: int = 32,
        stronger_rng: bool = False,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.model = model
        self.layers = decoder_layers(model)
        self.block_hash, self.public_key = block_hash, public_key
        self.seq_len, self.k, self.batch_size, self.stronger_rng = seq_len, k, batch_size, stronger_rng
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.hidden = model.config.hidden_size
        if not 0 < k <= self.hidden:
            raise ValueError(f"need 0 < k <= hidden ({self.hidden}), got k={k}")
        self.layer_vectors = [layer_vector(block_hash, i, self.hidden, device=self.device) for i in range(len(self.layers))]

    @torch.inference_mode()
    def hidden_states(self, nonces: Sequence[int]) -> torch.Tensor:
        """Last-token final-norm hidden states of one batch, [B, H] float32 (NaN rows included)."""
        nonces = [check_nonce(n) for n in nonces]
        embeds = ops.poc_inputs(self.block_hash, self.public_key, nonces, self.seq_len, self.hidden, self.dtype,
                                device=self.device, stronger_rng=self.stronger_rng)
        positions = torch.arange(self.seq_len, device=self.device).expand(len(nonces), -1)
        with reflection_hooks(self.layers, self.layer_vectors):
            out = self.model.model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, -1, :].float()

    def vectors(self, nonces: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """(kept nonces, fp16 vectors [B', k]) of one batch; NaN rows dropped before and after fp16."""
        hs = self.hidden_states(nonces)
        return readout_vectors(hs, self.block_hash, self.public_key, list(nonces), self.k)

    def run(self, nonces: Iterable[int], progress: ProgressCallback | None = None) -> list[Artifact]:
        """Artifacts for ``nonces`` in batches of ``batch_size`` (order kept, NaN nonces omitted)."""
        nonces = [check_nonce(n) for n in nonces]
        if len(set(nonces)) != len(nonces):
            raise ValueError("duplicate nonces in request")
        artifacts: list[Artifact] = []
        for start in range(0, len(nonces), self.batch_size):
            kept, vecs = self.vectors(nonces[start : start + self.batch_size])
            artifacts.extend(Artifact.from_vector(n, v) for n, v in zip(kept, vecs))
            if progress is not None:
                progress(min(start + self.batch_size, len(nonces)), len(nonces))
        return artifacts
