"""Online step-time models for the :class:`~cpoc_kernels.governor.Governor`.

A model predicts the wall time of one engine forward step and says how sure it is (a covariance of its
coefficients, so the governor can add ``z`` standard deviations of caution). Three models:

* :class:`WorkStepTimeModel` (the governor's default when it knows the model's shape): a roofline of the
  step's **bytes read** (weights touched, KV of its requests) and **FLOPs**, computed exactly from the
  step's work (:mod:`cpoc_kernels.step_work`); it learns the hardware's effective bandwidth, FLOP/s,
  overheads and the sharpness of the knee online.
* :class:`RooflineStepTimeModel` (the default otherwise): flat, then linear in the step's row count,
  the knee learned from the steps.
* :class:`StepTimeModel`: a ridge-regressed straight line (or hand-set knots) in rows.

All are deterministic (the same steps in the same order give the same predictions) and monotone in
``tokens``.
"""
from .common import _check_count, _check_real
from .rows import RooflineStepTimeModel, StepTimeModel
from .work import WorkStepTimeModel

__all__ = ["RooflineStepTimeModel", "StepTimeModel", "WorkStepTimeModel", "_check_count", "_check_real"]
