"""Request and response bodies of the backend's ``/api/v1/pow/*`` routes (spec mlnode_api.md §2).

Field names, types and defaults are the network's (GV20 ``vllm/poc/routes.py``, KG ``pow_v2_routes.py``):
unknown keys inside ``params`` → 422 (``extra="forbid"`` there), unknown top-level keys and unknown
``stat_test`` keys are ignored, except ``stat_test.p_value_threshold`` (the chain's name, which DAPI sends and
the reference drops): it is accepted and, when present, **wins** over ``fraud_threshold``, because the MLNode
proxy always forwards ``fraud_threshold`` with its own default (0.01) while ``p_value_threshold`` can only have
come from the chain. Beyond the reference (which would accept them and fail later): nonces outside int32, a
non-positive ``seq_len``/``k_dim``/``batch_size``, an invalid partition and thresholds outside their range are
rejected with 422 here, before any state changes.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# defaults of the network's backend (GV20 data.py / routes.py; env POC_BATCH_SIZE_DEFAULT)
BATCH_SIZE_DEFAULT = 32
K_DIM_DEFAULT = 12
DIST_THRESHOLD_DEFAULT = 0.02
P_MISMATCH_DEFAULT = 0.001
FRAUD_THRESHOLD_DEFAULT = 0.01

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Positive = Annotated[int, Field(gt=0)]


class PoCParams(BaseModel):
    """``params``: the model and the round's shape. Unknown keys → 422, as in the reference."""

    model_config = ConfigDict(extra="forbid")
    model: str
    seq_len: Positive
    k_dim: Positive = K_DIM_DEFAULT


class InitGenerateRequest(BaseModel):
    """``POST /api/v1/pow/init/generate`` (GV20 ``PoCInitGenerateRequest``)."""

    block_hash: str
    block_height: int
    public_key: str
    node_id: Annotated[int, Field(ge=0)]
    node_count: Positive
    group_id: Annotated[int, Field(ge=0)] = 0
    n_groups: Positive = 1
    batch_size: Positive = BATCH_SIZE_DEFAULT
    params: PoCParams
    url: str | None = None
    poc_stronger_rng: bool = False

    @model_validator(mode="after")
    def _partition(self):
        if self.node_id >= self.node_count:
            raise ValueError(f"need node_id < node_count, got node_id={self.node_id}, node_count={self.node_count}")
        if self.group_id >= self.n_groups:
            raise ValueError(f"need group_id < n_groups, got group_id={self.group_id}, n_groups={self.n_groups}")
        if self.node_id + self.group_id * self.node_count > INT32_MAX:
            raise ValueError("the partition's first nonce is outside int32")
        return self


class ArtifactIn(BaseModel):
    nonce: Int32
    vector_b64: str


class ValidationIn(BaseModel):
    artifacts: list[ArtifactIn]


class StatTest(BaseModel):
    """``stat_test``. Unknown keys are ignored (as in the reference); ``p_value_threshold`` is understood."""

    dist_threshold: Annotated[float, Field(gt=0, allow_inf_nan=False)] = DIST_THRESHOLD_DEFAULT
    p_mismatch: Annotated[float, Field(gt=0, lt=1)] = P_MISMATCH_DEFAULT
    fraud_threshold: Annotated[float, Field(gt=0, lt=1)] = FRAUD_THRESHOLD_DEFAULT
    p_value_threshold: Annotated[float, Field(gt=0, lt=1)] | None = None

    @property
    def effective_fraud_threshold(self) -> float:
        """``p_value_threshold`` if given (the chain's parameter), else ``fraud_threshold``."""
        return self.fraud_threshold if self.p_value_threshold is None else self.p_value_threshold


class GenerateRequest(BaseModel):
    """``POST /api/v1/pow/generate`` (GV20 ``PoCGenerateRequest``)."""

    block_hash: str
    block_height: int
    public_key: str
    node_id: int
    node_count: int
    nonces: list[Int32]
    params: PoCParams
    batch_size: Positive = BATCH_SIZE_DEFAULT
    wait: bool = False
    url: str | None = None
    validation: ValidationIn | None = None
    stat_test: StatTest | None = None
    poc_stronger_rng: bool = False


def encoding(k_dim: int) -> dict:
    """The ``encoding`` object of artifact payloads."""
    return {"dtype": "f16", "k_dim": k_dim, "endian": "le"}
