"""Built-in deterministic models."""
import hashlib

import pytest
import torch

from cpoc_kernels.integrations.hf.models import MODEL_CONFIGS, build_model, deterministic_uniform_
from cpoc_kernels.reference import mmh, seed32


def test_weights_follow_the_integer_rng_definition():
    """Independent recomputation: w = (2·fp32(mmh(i, seed))/2^32 − 1)·bound in fp32."""
    p = torch.empty(7, 5)
    deterministic_uniform_(p, "some.weight", 0.25)
    h = mmh(torch.arange(35), seed32("cpoc-weights-v1/some.weight"))
    want = ((h.to(torch.float32) / 4294967296.0) * 2.0 - 1.0) * 0.25
    assert torch.equal(p.flatten(), want)


def test_tiny_model_is_deterministic_and_qwen3_shaped():
    a, b = build_model("cpoc-tiny"), build_model("cpoc-tiny")
    assert type(a).__name__ == "Qwen3ForCausalLM"
    assert len(a.model.layers) == MODEL_CONFIGS["cpoc-tiny"]["num_hidden_layers"]
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert all(not p.requires_grad for p in a.parameters())
    assert not a.training


def test_tiny_model_weights_do_not_depend_on_torch_global_rng():
    torch.manual_seed(1)
    a = build_model("cpoc-tiny")
    torch.manual_seed(2)
    b = build_model("cpoc-tiny")
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_overrides_and_unknown_name():
    m = build_model("cpoc-tiny", num_hidden_layers=1)
    assert len(m.model.layers) == 1
    with pytest.raises(ValueError, match="unknown built-in model"):
        build_model("llama-70b")


def test_rope_buffers_are_real():
    m = build_model("cpoc-tiny")
    inv = m.model.rotary_emb.inv_freq
    hd = MODEL_CONFIGS["cpoc-tiny"]["head_dim"]
    base = m.config.rope_parameters["rope_theta"]
    want = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    assert torch.equal(inv, want)


def test_tiny_weights_fingerprint_is_stable():
    """Weights hash the same on every run (no hidden dependence on thread count or allocation)."""
    digests = set()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        m = build_model("cpoc-tiny")
        h = hashlib.sha256()
        for t in m.state_dict().values():
            h.update(t.contiguous().numpy().tobytes())
        digests.add(h.hexdigest())
    assert len(digests) == 1
