"""Recipes: plain JSON that replays a pruning exactly on the same dense weights.

A recipe records the spec, the layers it touched, the method's own details (per-layer pruned
counts for masks; kept channel indices for structured pruning) and the SHA-256 of the dense
weights it was computed from. Replaying on other weights is refused, because a magnitude
ranking on other weights would silently give another model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchlib.errors import ConfigError

RECIPE_SCHEMA_VERSION = 1
"""History: 1 - first version."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a pruning did, enough to redo it. JSON round trip is exact."""

    spec: str
    layers: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    base_sha256: str = ""
    schema_version: int = RECIPE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "spec": self.spec,
            "layers": list(self.layers),
            "details": dict(self.details),
            "base_sha256": self.base_sha256,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: reports cite it to name a variant exactly."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        version = data.get("schema_version")
        if version != RECIPE_SCHEMA_VERSION:
            raise ConfigError(
                f"recipe schema_version {version!r} is not supported; "
                f"choose from: {RECIPE_SCHEMA_VERSION}"
            )
        try:
            return cls(
                spec=str(data["spec"]),
                layers=tuple(data.get("layers", ())),
                details=dict(data.get("details", {})),
                base_sha256=str(data.get("base_sha256", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed recipe: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read recipe {str(path)!r}: {exc}") from exc


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (names and raw bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
