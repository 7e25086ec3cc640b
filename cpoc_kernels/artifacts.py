"""PoC v2 artifacts and the artifact file (the fleet JSON format of ``shared/golden/fleet/``)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cpoc_kernels.reference.codec import decode_vector, encode_vector
from cpoc_kernels.reference.readout import K_DIM

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def check_nonce(nonce) -> int:
    """A nonce as a Python int in the chain's int32 range; anything else → ValueError."""
    if isinstance(nonce, bool) or not isinstance(nonce, (int, np.integer)):
        raise ValueError(f"nonce must be an integer, got {nonce!r}")
    nonce = int(nonce)
    if not INT32_MIN <= nonce <= INT32_MAX:
        raise ValueError(f"nonce {nonce} is outside the chain's int32 range")
    return nonce


MAX_K_DIM = 1024  # the chain uses 12; anything near this bound is a malformed file, not a model
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Artifact:
    """One nonce's artifact: k×fp16 LE vector as standard base64 (32 chars for k = 12).

    The nonce is checked (int32 int) and ``vector_b64`` must be a string; its content is judged by
    :func:`cpoc_kernels.validate.validate` (a malformed received vector is a mismatch, not a load error).
    """

    nonce: int
    vector_b64: str

    def __post_init__(self):
        object.__setattr__(self, "nonce", check_nonce(self.nonce))
        if not isinstance(self.vector_b64, str):
            raise ValueError(f"vector_b64 of nonce {self.nonce} must be a string, got {type(self.vector_b64).__name__}")

    @classmethod
    def from_vector(cls, nonce: int, v16) -> "Artifact":
        try:
            k = len(v16)
        except TypeError:
            raise ValueError(f"artifact vector must be a 1-D float array, got {type(v16).__name__}") from None
        return cls(check_nonce(nonce), encode_vector(v16, k))

    def vector(self, k: int = K_DIM) -> np.ndarray:
        """Decoded float32 [k]; malformed → ValueError."""
        return decode_vector(self.vector_b64, k)


def _field_int(doc: dict, name: str, lo: int, hi: int, default=None, where: str = "") -> int:
    """doc[name] as a JSON integer (no bool, float or string) in [lo, hi] → int; else ValueError naming it."""
    label = where + name
    if name not in doc:
        if default is None:
            raise ValueError(f"artifact file lacks required field: {label}")
        return default
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"artifact file field {label!r} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ValueError(f"artifact file field {label!r} must be in [{lo}, {hi}], got {_show(value)}")
    return value


def _field_str(doc: dict, name: str, default=None, nonempty: bool = True) -> str:
    if name not in doc:
        if default is None:
            raise ValueError(f"artifact file lacks required field: {name}")
        return default
    value = doc[name]
    if not isinstance(value, str):
        raise ValueError(f"artifact file field {name!r} must be a string, got {_show(value)}")
    if nonempty and not value:
        raise ValueError(f"artifact file field {name!r} must not be empty")
    return value


def _show(value) -> str:
    """A short description of a JSON value for error messages (never a huge dump)."""
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    kind = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "value")
    return f"{kind} {text}"


@dataclass
class ArtifactFile:
    """Artifacts of one (block_hash, public_key, model, seq_len) round, fleet file layout.

    Loading checks every field (type and range) and raises ValueError naming the field: ``model`` str;
    ``block_hash``/``public_key`` non-empty str; ``seq_len`` int in [1, 2**31-1]; ``k_dim`` int in
    [1, MAX_K_DIM] (top level and ``encoding.k_dim`` must agree); ``block_height`` int >= 0;
    ``node_count`` int in [1, 2**31-1]; ``node_id`` int in [0, node_count); ``artifacts`` a list of
    {nonce: int32, vector_b64: str} objects with distinct nonces; ``dtype`` str and ``poc_stronger_rng``
    bool where present. Other fields are kept as they are in ``extra``.
    """

    model: str
    block_hash: str
    public_key: str
    seq_len: int
    k_dim: int = K_DIM
    block_height: int = 0
    node_id: int = 0
    node_count: int = 1
    artifacts: list[Artifact] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # other fields of the file (stat_test, source, ...), kept as is

    _FIELDS = ("model", "block_hash", "public_key", "seq_len", "k_dim", "block_height", "node_id", "node_count")

    def to_json(self) -> dict:
        doc = {name: getattr(self, name) for name in self._FIELDS}
        doc.update(self.extra)
        doc["encoding"] = {"dtype": "f16", "k_dim": self.k_dim, "endian": "le"}
        doc["artifacts"] = [{"nonce": a.nonce, "vector_b64": a.vector_b64} for a in self.artifacts]
        return doc

    @classmethod
    def from_json(cls, doc) -> "ArtifactFile":
        """Parse a decoded JSON document; anything malformed → ValueError naming the field."""
        if not isinstance(doc, dict):
            raise ValueError(f"artifact file must be a JSON object, got {_show(doc)}")
        missing = [name for name in ("block_hash", "public_key", "seq_len", "artifacts") if name not in doc]
        if missing:
            raise ValueError(f"artifact file lacks required field(s): {', '.join(missing)}")
        encoding = doc.get("encoding", {})
        if not isinstance(encoding, dict):
            raise ValueError(f"artifact file field 'encoding' must be an object, got {_show(encoding)}")
        if encoding.get("dtype", "f16") != "f16" or encoding.get("endian", "le") != "le":
            raise ValueError(f"unsupported artifact encoding {_show(encoding)}; expected f16 little-endian")
        k_enc = _field_int(encoding, "k_dim", 1, MAX_K_DIM, default=0, where="encoding.") or None
        k_dim = _field_int(doc, "k_dim", 1, MAX_K_DIM, default=k_enc or K_DIM)
        if k_enc is not None and k_enc != k_dim:
            raise ValueError(f"artifact file field 'k_dim' ({k_dim}) disagrees with encoding.k_dim ({k_enc})")
        node_count = _field_int(doc, "node_count", 1, INT32_MAX, default=1)
        node_id = _field_int(doc, "node_id", 0, INT32_MAX, default=0)
        if node_id >= node_count:
            raise ValueError(f"artifact file field 'node_id' ({node_id}) must be < node_count ({node_count})")
        for name, kind in (("dtype", str), ("poc_stronger_rng", bool)):
            if name in doc and not isinstance(doc[name], kind):
                raise ValueError(f"artifact file field {name!r} must be a {kind.__name__}, got {_show(doc[name])}")
        items = doc["artifacts"]
        if not isinstance(items, list):
            raise ValueError(f"artifact file field 'artifacts' must be a list, got {_show(items)}")
        artifacts, seen = [], set()
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "nonce" not in item or "vector_b64" not in item:
                raise ValueError(f"artifacts[{i}] must be an object with 'nonce' and 'vector_b64', got {_show(item)}")
            try:
                art = Artifact(item["nonce"], item["vector_b64"])
            except ValueError as exc:
                raise ValueError(f"artifacts[{i}]: {exc}") from None
            if art.nonce in seen:
                raise ValueError(f"duplicate nonce {art.nonce} in artifact file (artifacts[{i}])")
            seen.add(art.nonce)
            artifacts.append(art)
        extra = {k: v for k, v in doc.items() if k not in cls._FIELDS and k not in ("encoding", "artifacts")}
        return cls(
            model=_field_str(doc, "model", default="", nonempty=False),
            block_hash=_field_str(doc, "block_hash"),
            public_key=_field_str(doc, "public_key"),
            seq_len=_field_int(doc, "seq_len", 1, INT32_MAX),
            k_dim=k_dim,
            block_height=_field_int(doc, "block_height", 0, INT64_MAX, default=0),
            node_id=node_id,
            node_count=node_count,
            artifacts=artifacts,
            extra=extra,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArtifactFile":
        try:
            doc = json.loads(Path(path).read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (not UTF-8 text: byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
        try:
            return cls.from_json(doc)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename): a crash never leaves a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_json(), fh, indent=1)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
