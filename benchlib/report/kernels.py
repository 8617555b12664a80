"""What ran sparse: per cell of a sparse-kernel target, the kernels and layers, as a ``Grid``.

A sparse target's speedup is only read right next to what it ran: how many layers went sparse
(the rest stayed dense: not sparse enough, or timed slower sparse), on which kernel (and
instruction set), what the weights take as stored, and what was fused around them. The
targets put this in their record's ``info`` (``cpu-sparse``: ``sparse_layers``,
``dense_layers``, ``kernels``, ``weight_bytes_stored`` / ``weight_bytes_dense`` (and
``weight_bytes_plans``: what its native plans hold beside the weights), ``fusion``,
``native``; ``cuda-sparse24``: ``converted_layers`` and ``dense_layers`` as lists, ``engine``,
``weight_bytes_compressed``); this module reads it back for the console and Markdown reports.
Cells whose ``info`` has no layer counts (dense targets, failed cells) get no row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

from benchlib.report.console import CellView, Grid, fmt_mib

FUSIONS = (
    ("batchnorm_folded", "BN folded"),
    ("residual_fused", "adds fused"),
    ("relu_fused", "ReLU fused"),
    ("max_pools", "native max pool"),
    ("chained", "layers chained"),
    ("avgpools_chained", "avg pool chained"),
    ("linears_chained", "linear chained"),
    ("banded", "layers banded"),
    ("padded_planes", "layers in padded planes"),
    ("copies_fused", "layout copies fused"),
)
"""``info["fusion"]`` counts as shown, in this order."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """A layer count given as a number or as the collection of those layers."""
    if isinstance(value, (Sequence, Mapping)) and not isinstance(value, str):
        return len(value)
    return _int(value)


def kernels_text(info: Mapping[str, Any]) -> str:
    """The kernels a cell ran (``native-csr (avx2)``; the engine where the target names no
    kernels), and why the native ones did not build where they did not."""
    kernels = info.get("kernels")
    if isinstance(kernels, Sequence) and not isinstance(kernels, str):
        names = ", ".join(str(k) for k in kernels)
    else:
        names = str(info.get("engine") or "")
    native = info.get("native")
    if isinstance(native, Mapping):
        if native.get("available") and native.get("isa"):
            names = f"{names} ({native['isa']})" if names else names
        elif native.get("reason"):
            names = f"{names}; native kernels unavailable: {native['reason']}"
    return names or "none (every layer dense)"


def fusion_text(info: Mapping[str, Any]) -> str:
    """The fusions a cell's model got (``53 BN folded, 40 ReLU fused``), or why none."""
    fusion = info.get("fusion")
    if not isinstance(fusion, Mapping):
        return "-"
    done = [f"{n} {label}" for key, label in FUSIONS if (n := _int(fusion.get(key)))]
    skipped = fusion.get("skipped")
    if skipped:
        done.append(f"not traced: {skipped}")
    return ", ".join(done) or "none"


def kernels_grid(views: Sequence[CellView]) -> Grid | None:
    """One row per cell whose ``info`` counts sparse and dense layers: variant, batch size,
    target, layers sparse / all, kernels, weights stored against dense (MiB; below, what the
    native plans hold beside them), fusions. None when no cell has such counts."""
    rows = []
    for view in views:
        info, row = view.record.info, view.row
        sparse = _count(info.get("sparse_layers", info.get("converted_layers")))
        dense = _count(info.get("dense_layers"))
        if sparse is None or dense is None:
            continue
        stored = info.get("weight_bytes_stored", info.get("weight_bytes_compressed"))
        full = info.get("weight_bytes_dense")
        plans = _int(info.get("weight_bytes_plans"))
        weights = "-"
        if _int(stored) and _int(full):
            extra = f"\n+{fmt_mib(plans)} plans" if plans else ""  # a line of its own
            weights = f"{fmt_mib(stored)} / {fmt_mib(full)}{extra}"
        rows.append(
            (
                Text(row.spec),
                Text(str(row.batch_size)),
                Text(row.target),
                Text(f"{sparse} / {sparse + dense}"),
                Text(kernels_text(info)),
                Text(weights),
                Text(fusion_text(info)),
            )
        )
    if not rows:
        return None
    return Grid(
        f"{views[0].row.model}: what ran sparse",
        ("Variant", "bs", "Target", "Sparse layers", "Kernels", "Weights MiB", "Fusions"),
        (False, True, False, True, False, True, False),
        tuple(rows),
    )
