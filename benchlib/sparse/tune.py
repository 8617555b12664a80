"""Keep a layer sparse only where it is faster: each converted layer timed against its dense
original on the input it really gets.

Why timing and not a density table: where a sparse layer breaks even depends on its shape and
on the machine. Measured on ResNet-50's layers (``benchmarks/sparse_kernels.py``, 2 threads),
the native kernels break even between density 0.35 (a 1x1 conv at 14x14) and 0.6 (a strided
3x3 at 14x14) on an AMD EPYC with AVX-512, and above density 0.5 for most layers on one with
AVX2 only (``convert``'s tables); a table measured on one would misjudge the other, and a
per-layer timing costs about a second for ResNet-50. The density threshold stays as the gate:
layers above it are never timed, which keeps preparation short and the choice stable where it
cannot pay.

``keep_faster`` runs the converted model once with hooks to capture every sparse layer's input
(so the shapes are the real ones), times each sparse layer against its dense original
(``interleaved_seconds``: alternating blocks of calls, so that a slow minute of a shared machine
weighs on both sides alike rather than on whichever ran then; each side's time is its fastest
block's median, as a slow phase only ever adds time) and swaps the dense one back where it is
not faster. The comparison is a parameter, so tests decide without a clock.

Each side is timed as it will run: where the fusions will fold the residual add or the ReLU
after a layer into the sparse kernel (``fuse.epilogues``), the sparse layer is timed applying
them and the dense one followed by them (an add and a ReLU pass over the output). A close call
(within ``TIE``) and a layer that looks slower sparse are timed a second time and the two
timings averaged, so a layer goes dense only on two looks: on this shared VM a layer near
break-even otherwise flipped between runs (ResNet-50 ``magnitude:0.9``'s 1x1 convs of density
0.6-0.7 went dense in slow minutes, 2 of them in one run at 2026-12-03 10:20 UTC, and each one
cut the native chain in two and ran through PyTorch's slower dense conv).

A native conv that the fusions will run in a ``NativeChain`` is timed as the chain runs it
(``bands.ChainedConv``: its activations in bands of rows, no tensor allocated per call). Timed
alone through its module, a layer misses what the chain gives it: the bands (ResNet-50's 1x1
convs at 56x56 and 28x28 took 0.79-0.93x the time in them, per step in the chain) and 15-25 us
of Python a call. So timed, in a slow phase at 2026-12-03 12:54 UTC, two of ResNet-50's 1x1
convs near density 0.6 (1.16-1.27x faster sparse alone in calm minutes) went dense again on
both looks; timed as chained, three preparations in a row kept every layer sparse, the closest
call 1.28x faster sparse.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from benchlib.sparse.bands import ChainedConv
from benchlib.sparse.convert import LayerReport
from benchlib.sparse.fuse import Epilogue
from benchlib.sparse.modules import SparseConv2d

Compare = Callable[[nn.Module, nn.Module, torch.Tensor], tuple[float, float]]
"""Seconds per call of two layers on one input, (first, second): ``interleaved_seconds``."""
ROUNDS = 3
BLOCK = 3
TIE = 1.1
"""A sparse / dense timing ratio above 1 / TIE (close, or the sparse layer slower) is timed once
more."""


def interleaved_seconds(
    first: nn.Module, second: nn.Module, x: torch.Tensor, rounds: int = ROUNDS, block: int = BLOCK
) -> tuple[float, float]:
    """Seconds per call of ``first(x)`` and of ``second(x)``: ``rounds`` rounds of a block for
    each in turn, every block one untimed call (the first call after another layer ran is the
    slow one) and ``block`` timed calls; each side's result is the smallest of its blocks'
    medians (a slow phase of a shared machine only adds time, so the fastest block is the
    layer's own speed; the median within a block keeps one lucky call from deciding)."""
    blocks: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for _ in range(rounds):
            for layer, medians in zip((first, second), blocks, strict=True):
                layer(x)
                times = []
                for _ in range(block):
                    start = time.perf_counter_ns()
                    layer(x)
                    times.append(time.perf_counter_ns() - start)
                medians.append(statistics.median(times))
    return min(blocks[0]) / 1e9, min(blocks[1]) / 1e9


def _inputs(model: nn.Module, names: set[str], args: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    """The first input each named layer receives in one forward pass of ``model``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:

            def hook(_: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
                if name not in seen and inputs and isinstance(inputs[0], torch.Tensor):
                    seen[name] = inputs[0].detach().clone()

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


class _SparseAsFused(nn.Module):
    """A sparse layer adding ``residual`` in its kernel (when given); its ReLU is set by the
    caller."""

    def __init__(self, layer: nn.Module, residual: torch.Tensor | None) -> None:
        super().__init__()
        self.layer, self.residual = layer, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x) if self.residual is None else self.layer(x, self.residual)
        return out


class _DenseThenEpilogue(nn.Module):
    """A dense layer, then the add of ``residual`` (in place, as ``out += identity``) and
    the ReLU that its sparse twin would fuse."""

    def __init__(self, layer: nn.Module, residual: torch.Tensor | None, relu: bool) -> None:
        super().__init__()
        self.layer, self.residual, self.relu = layer, residual, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        if self.residual is not None:
            out += self.residual
        return out.relu_() if self.relu else out


def _timed(
    compare: Compare,
    layer: nn.Module,
    dense: nn.Module,
    x: torch.Tensor,
    epilogue: Epilogue,
    chained: bool = False,
) -> tuple[float, float]:
    """Seconds per call of the sparse ``layer`` and of ``dense`` on ``x``, each with the
    ``epilogue`` as it will run (the sparse layer's ``relu`` is set only while timed); a
    ``chained`` native conv as a chain runs it (``bands.ChainedConv``)."""
    residual = None
    if epilogue.residual:
        with torch.inference_mode():
            residual = torch.randn_like(dense(x))
    if chained and isinstance(layer, SparseConv2d) and layer.gather_plan(x) is not None:
        with torch.inference_mode():
            twin = ChainedConv(layer, x, residual, epilogue.relu)
        return compare(twin, _DenseThenEpilogue(dense, residual, epilogue.relu), x)
    if not epilogue:
        return compare(layer, dense, x)
    relu = bool(getattr(layer, "relu", False))
    setattr(layer, "relu", epilogue.relu)  # noqa: B010 - a plain flag of SparseConv2d / Linear
    try:
        return compare(
            _SparseAsFused(layer, residual),
            _DenseThenEpilogue(dense, residual, epilogue.relu),
            x,
        )
    finally:
        setattr(layer, "relu", relu)  # noqa: B010


def keep_faster(
    model: nn.Module,
    reports: list[LayerReport],
    dense: Mapping[str, nn.Module],
    inputs: tuple[Any, ...],
    compare: Compare = interleaved_seconds,
    epilogues: Mapping[str, Epilogue] | None = None,
    chained: Collection[str] = frozenset(),
) -> list[LayerReport]:
    """Swap back into ``model`` (in place) the dense layer of every sparse one that is not
    faster on its real input; returns the reports, updated for the layers swapped back (and
    with both timings in the reason of every timed layer).

    ``dense`` maps a sparse layer's name to its dense original; ``inputs`` are the model's;
    ``epilogues`` (``fuse.epilogues``) what the fusions will fold into a layer: both sides are
    timed with it; ``chained`` names the native convs the fusions will run in a
    ``NativeChain``: each is timed as the chain runs it (``bands.ChainedConv``). A layer that
    looks slower sparse, or within ``TIE`` of dense, is timed twice. A layer that receives no
    tensor in that pass keeps its density decision.
    """
    sparse = {r.name for r in reports if r.sparse and r.name in dense and r.name}
    seen = _inputs(model, sparse, inputs)
    updated = []
    for report in reports:
        x = seen.get(report.name)
        if x is None:
            updated.append(report)
            continue
        layer = model.get_submodule(report.name)
        epilogue = (epilogues or {}).get(report.name, Epilogue())
        in_chain = report.name in chained
        sparse_s, dense_s = _timed(compare, layer, dense[report.name], x, epilogue, in_chain)
        if dense_s <= TIE * sparse_s:  # close, or dense looks faster: a second look
            again = _timed(compare, layer, dense[report.name], x, epilogue, in_chain)
            sparse_s, dense_s = (sparse_s + again[0]) / 2, (dense_s + again[1]) / 2
        timing = f"{report.kernel} {sparse_s * 1e3:.3g} ms vs dense {dense_s * 1e3:.3g} ms"
        where = f"on {tuple(x.shape)}" + (f", each with the {epilogue} after" if epilogue else "")
        where += ", sparse as chained" if in_chain else ""
        if sparse_s < dense_s:
            updated.append(replace(report, reason=f"{report.reason}; {timing} {where}"))
            continue
        for name in [n for n, m in model.named_modules(remove_duplicate=False) if m is layer]:
            model.set_submodule(name, dense[report.name])  # a shared layer everywhere
        updated.append(
            replace(
                report,
                sparse=False,
                reason=f"not faster sparse: {timing} {where}",
                format="dense",
                kernel=None,
                stored_bytes=report.dense_bytes,
            )
        )
    return updated
