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


@dataclass(frozen=True)
class Artifact:
    """One nonce's artifact: k×fp16 LE vector as standard base64 (32 chars for k = 12)."""

    nonce: int
    vector_b64: str

    @classmethod
    def from_vector(cls, nonce: int, v16) -> "Artifact":
        return cls(check_nonce(nonce), encode_vector(v16, len(v16)))

    def vector(self, k: int = K_DIM) -> np.ndarray:
        """Decoded float32 [k]; malformed → ValueError."""
        return decode_vector(self.vector_b64, k)


@dataclass
class ArtifactFile:
    """Artifacts of one (block_hash, public_key, model, seq_len) round, fleet file layout."""

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
    def from_json(cls, doc: dict) -> "ArtifactFile":
        missing = [name for name in ("block_hash", "public_key", "seq_len", "artifacts") if name not in doc]
        if missing:
            raise ValueError(f"artifact file lacks required field(s): {', '.join(missing)}")
        encoding = doc.get("encoding", {"dtype": "f16", "endian": "le"})
        if encoding.get("dtype", "f16") != "f16" or encoding.get("endian", "le") != "le":
            raise ValueError(f"unsupported artifact encoding {encoding}; expected f16 little-endian")
        k_dim = int(doc.get("k_dim", encoding.get("k_dim", K_DIM)))
        artifacts, seen = [], set()
        for i, item in enumerate(doc["artifacts"]):
            try:
                art = Artifact(check_nonce(item["nonce"]), item["vector_b64"])
            except (KeyError, TypeError) as exc:
                raise ValueError(f"artifact #{i} is malformed: {exc!r}") from None
            if art.nonce in seen:
                raise ValueError(f"duplicate nonce {art.nonce} in artifact file")
            seen.add(art.nonce)
            artifacts.append(art)
        extra = {k: v for k, v in doc.items() if k not in cls._FIELDS and k not in ("encoding", "artifacts")}
        return cls(
            model=str(doc.get("model", "")),
            block_hash=str(doc["block_hash"]),
            public_key=str(doc["public_key"]),
            seq_len=int(doc["seq_len"]),
            k_dim=k_dim,
            block_height=int(doc.get("block_height", 0)),
            node_id=int(doc.get("node_id", 0)),
            node_count=int(doc.get("node_count", 1)),
            artifacts=artifacts,
            extra=extra,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArtifactFile":
        try:
            doc = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(doc)

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
