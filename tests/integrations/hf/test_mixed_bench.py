"""mixed_bench: the engine-idle clock behind the bench's measured idle share."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from cpoc_kernels.integrations.hf.mixed_bench import EngineSettings, chat_requests, run_session  # noqa: E402
from cpoc_kernels.integrations.hf.models import build_model  # noqa: E402

SETTINGS = EngineSettings(max_batch_tokens=64, num_blocks=64, page_size=16, max_requests_per_batch=8,
                          prompt_len=(4, 8), output_len=(2, 3))


@pytest.fixture(scope="module")
def model():
    return build_model("cpoc-tiny", dtype=torch.float32)


def test_idle_clock_sparse_vs_burst(model):
    """Two short requests 0.4 s apart leave the engine idle most of the window; a burst keeps it busy."""
    reqs = chat_requests(2, 0, SETTINGS, model.config.vocab_size)
    sparse = run_session(model, SETTINGS, reqs, [0.0, 0.4], poc=False)
    assert sparse.window_s >= 0.4 and 0.6 < sparse.idle_fraction < 1.0
    assert sparse.engine_idle_s <= sparse.window_s
    burst = run_session(model, SETTINGS, chat_requests(24, 1, SETTINGS, model.config.vocab_size), [0.0] * 24,
                        poc=False)
    assert burst.idle_fraction < 0.2 < sparse.idle_fraction
