"""Engine simulator: continuous batching with chat and PoC on GPU-shaped step-time curves.

:mod:`.hardware` (cards, presets, the step-time curve from :mod:`cpoc_kernels.cost`), :mod:`.workload`
(chat traces), :mod:`.engine` (the discrete-event engine driving the real :class:`~cpoc_kernels.governor.Governor`
and :class:`~cpoc_kernels.integrations.vllm.client.PoCAdmission`), :mod:`.bench` (``cpoc bench-sim``).
"""
from .engine import PATHS, POLICIES, RunResult, SimConfig, StepRecord, simulate
from .hardware import CARDS, PRESETS, Card, EnginePreset, StepCurve, StepWork
from .workload import ARRIVALS, ChatArrival, chat_trace

__all__ = ["ARRIVALS", "CARDS", "PATHS", "POLICIES", "PRESETS", "Card", "ChatArrival", "EnginePreset", "RunResult",
           "SimConfig", "StepCurve", "StepRecord", "StepWork", "chat_trace", "simulate"]
