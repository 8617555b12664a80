"""Which layers of a TensorRT engine run sparse kernels: from the builder's log or the engine
inspector, whichever tells.

Two witnesses, both of TensorRT 10:

* the builder logs, at INFO level at the end of a build with ``BuilderFlag.SPARSE_WEIGHTS``
  (TensorRT developer guide, "Structured Sparsity"; the same lines in TensorRT 10 logs quoted
  in github.com/NVIDIA/TensorRT/issues/4054)::

      (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
      (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3

* the engine inspector's JSON (``IEngineInspector.get_engine_information``, built with
  ``ProfilingVerbosity.DETAILED``) lists each layer with its kernel in ``TacticName``; sparse
  tensor-core kernels carry ``sparse`` in the name (``sm80_xmma_fprop_sparse_conv_...``).

The log is TensorRT's own statement and is preferred; a plan loaded from the cache has no
build log, and then the inspector answers. When neither tells, the report says ``"unknown"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

UNKNOWN = "unknown"
ELIGIBLE_MARKER = "Layers eligible for sparse math:"
PICKED_MARKER = "picked sparse implementation for layers:"
SPARSE_TACTIC_TOKEN = "sparse"


@dataclass(frozen=True)
class SparsityLog:
    """The two sparsity lines of a build log; None where the line was not logged."""

    eligible: list[str] | None
    picked: list[str] | None


def log_sparsity(messages: Iterable[str]) -> SparsityLog:
    """Read the ``(Sparsity)`` lines among builder log ``messages`` (the last of each wins).

    Messages may carry trtexec's prefix (``[03/23/2021-00:14:05] [I] [TRT] ...``); layer names
    are split on ``", "`` (TensorRT joins fused layers with ``" + "``, which stays inside one).
    """
    eligible: list[str] | None = None
    picked: list[str] | None = None
    for message in messages:
        for marker in (ELIGIBLE_MARKER, PICKED_MARKER):
            _, found, rest = message.partition(marker)
            if not found:
                continue
            names = [name.strip() for name in rest.split(", ") if name.strip()]
            if marker == ELIGIBLE_MARKER:
                eligible = names
            else:
                picked = names
    return SparsityLog(eligible=eligible, picked=picked)


def inspector_sparse_layers(information: str) -> list[str] | None:
    """Names of the layers whose kernel is a sparse one, from the engine inspector's JSON.

    None when the inspector cannot tell: text that is not the inspector's JSON object, layers
    listed by name only (an engine built without ``ProfilingVerbosity.DETAILED``), or no layer
    carrying a ``TacticName``.
    """
    try:
        document = json.loads(information)
    except (TypeError, ValueError):
        return None
    layers = document.get("Layers") if isinstance(document, dict) else None
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        return None
    if not any("TacticName" in layer for layer in layers):
        return None
    return [
        str(layer.get("Name", ""))
        for layer in layers
        if SPARSE_TACTIC_TOKEN in str(layer.get("TacticName", "")).lower()
    ]


def sparse_report(
    log: SparsityLog, inspector: list[str] | None
) -> tuple[list[str] | str, str | None]:
    """The layers that run sparse and who said so: ``(names, "builder log")``, ``(names,
    "engine inspector")``, or ``("unknown", None)`` when neither tells."""
    if log.picked is not None:
        return log.picked, "builder log"
    if inspector is not None:
        return inspector, "engine inspector"
    return UNKNOWN, None
