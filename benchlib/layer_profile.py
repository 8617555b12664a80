"""Per-layer time of an eager module, from ``torch.profiler``: operator time mapped to layers.

A *layer* is a module the FLOP count names (conv, linear, attention: counted whole) or a leaf
module (norms, activations, pooling); modules inside a whole-counted one are not layers of
their own. Each layer call opens a profiler range ``layer::NAME`` (forward pre/post hooks);
every operator's self time goes to the innermost range around it, and what runs outside any
layer (residual adds, ``torch.flatten``, the Python of ``forward``) to :data:`OTHER`, so that
the layers add up to the profiled inference exactly.

Times are seconds per inference (one call of the model on the cell's batch): per layer, its
mean over the middle half of the profiled iterations ranked by their total (the iterations a
preemption of a shared machine slowed, and the luckiest ones, are left out), so the layers add
up to the interquartile mean of the iterations' totals, a figure set beside the median. On
the CPU a layer's time is the self CPU time of its operators, on CUDA the device time of the
kernels they launched (so a launch-bound model's layers add up to less than its end-to-end
latency, and the ratio to the measured median says how much less). The profiler costs a few
microseconds per operator: on sub-millisecond models the profiled total exceeds the unprofiled
latency; the diagnosis shows that ratio.

``unprofiled_s`` is the median wall time of as many unprofiled inferences, interleaved with
the profiled ones in rounds of :data:`ROUND` (unprofiled, then profiled): the end-to-end latency
the layers should add up to, measured at the same moments (a shared machine's speed drifts
between the cell's timing and its profile, and within seconds).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from benchlib.errors import ConfigError
from benchlib.flops import DEFAULT_RULES, FlopReport
from benchlib.pruning.attention import HeadPrunedAttention
from benchlib.target import Precision

OTHER = "(other: functional ops)"
"""The layer of everything that runs outside any layer module."""
LAYER_PREFIX = "layer::"
ITERATION = "benchlib::inference"
PROFILE_ITERATIONS = 20
"""Profiled inferences per cell, after :data:`PROFILE_WARMUP` unprofiled ones."""
PROFILE_WARMUP = 3
ROUND = 2
"""Profiled inferences per profiler session; each session follows as many unprofiled ones."""
KINETO_QUIET = "6"
"""Above Kineto's highest log level (its errors still reach Python as exceptions)."""
WHOLE: tuple[type[nn.Module], ...] = (*DEFAULT_RULES, HeadPrunedAttention)
"""Module classes the FLOP count takes whole: their submodules are not layers of their own."""


@dataclass(frozen=True, kw_only=True)
class LayerTime:
    """One layer of one cell.

    ``time_s``: seconds per inference. ``macs`` / ``nonzero_macs``: per image, as in
    ``benchlib.flops`` (0 for layers without conv/linear/matmul work). ``bytes``: bytes the
    layer's calls read and write per inference in the cell's precision (input and output
    tensors plus its weights; 0 for :data:`OTHER`). ``pruned``: the pruning spec changed the
    layer. ``channels``: (in, out) of a conv or linear layer, else None.
    """

    name: str
    kind: str
    time_s: float
    calls: int
    macs: int
    nonzero_macs: int
    bytes: int
    pruned: bool
    channels: tuple[int, int] | None = None

    def intensity(self, batch_size: int) -> float | None:
        """Arithmetic intensity in FLOP per byte moved (2 x MACs over ``bytes``), None without
        MACs or bytes."""
        if not self.macs or not self.bytes:
            return None
        return 2.0 * self.macs * batch_size / self.bytes


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """The layers of one cell in execution order, :data:`OTHER` last. ``clock`` says what
    ``time_s`` counts ("cpu self time" or "cuda kernel time"); ``unprofiled_s`` is the median
    seconds of the unprofiled inferences interleaved with the profiled ones (None in older
    records)."""

    layers: tuple[LayerTime, ...]
    iterations: int
    batch_size: int
    clock: str
    unprofiled_s: float | None = None

    @property
    def total_s(self) -> float:
        """Seconds per inference of all layers together."""
        return sum(layer.time_s for layer in self.layers)

    def by_name(self) -> dict[str, LayerTime]:
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists, not tuples): what a CellRecord stores and reads back."""
        layers = [
            asdict(layer) | {"channels": list(layer.channels) if layer.channels else None}
            for layer in self.layers
        ]
        return asdict(self) | {"layers": layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerProfile:
        """Inverse of :meth:`to_dict`; raises ConfigError for anything else."""
        try:
            layers = []
            for raw in data["layers"]:
                fields = dict(raw)
                if fields.get("channels") is not None:
                    fields["channels"] = tuple(fields["channels"])
                layers.append(LayerTime(**fields))
            return cls(
                layers=tuple(layers),
                iterations=data["iterations"],
                batch_size=data["batch_size"],
                clock=data["clock"],
                unprofiled_s=data.get("unprofiled_s"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed layer profile: {exc!r}") from exc


def layer_modules(model: nn.Module, counted: Iterable[str]) -> dict[str, nn.Module]:
    """The layers of ``model`` by name: modules named in ``counted`` (the FLOP report's layers)
    and leaf modules, except those inside a module the FLOP rules count whole. A TorchScript
    module takes no hooks: it has no layers, and all its time is :data:`OTHER`'s."""
    if isinstance(model, torch.jit.ScriptModule):
        return {}
    counted = set(counted)
    found: dict[str, nn.Module] = {}
    whole: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in whole):
            continue
        counted_whole = isinstance(module, WHOLE)
        if counted_whole:
            whole.append(name)
        if counted_whole or name in counted or next(module.children(), None) is None:
            found[name] = module
    return found


def _channels(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _shape_pass(
    layers: Mapping[str, nn.Module], run: Callable[[], Any]
) -> tuple[dict[str, int], dict[str, int]]:
    """(calls, bytes moved) per layer over one inference."""
    calls = dict.fromkeys(layers, 0)
    moved = dict.fromkeys(layers, 0)
    handles = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] += 1
            weights = sum(p.numel() * p.element_size() for p in module.parameters())
            moved[name] += _tensor_bytes(args) + _tensor_bytes(output) + weights

        return record

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hook(name)))
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls, moved


def _range_opener() -> Callable[[str], Any]:
    # torch's own light-weight range (what FX graph profiling uses); the public
    # record_function costs about 3x as much per call, which shows on sub-ms layers.
    fast = getattr(torch._C._profiler, "_RecordFunctionFast", None)
    return fast if fast is not None else torch.profiler.record_function


def _attach_ranges(layers: Mapping[str, nn.Module]) -> list[Any]:
    opener = _range_opener()
    open_ranges: list[Any] = []
    handles = []

    def enter(name: str) -> Callable[[nn.Module, Any], None]:
        def pre(module: nn.Module, args: Any) -> None:
            scope = opener(LAYER_PREFIX + name)
            scope.__enter__()
            open_ranges.append(scope)

        return pre

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


def attribute(events: Iterable[FunctionEvent], *, device_time: bool) -> list[dict[str, float]]:
    """Per profiled iteration (an :data:`ITERATION` range), seconds per layer name: each event's
    self time goes to its innermost ``layer::`` range, else to :data:`OTHER`. Events outside
    any iteration are ignored; the iteration range's own self time is OTHER's."""
    per_root: dict[int, dict[str, float]] = {}
    starts: dict[int, float] = {}
    for event in events:
        layer, node = None, event
        while node.cpu_parent is not None:
            if layer is None and node.name.startswith(LAYER_PREFIX):
                layer = node.name[len(LAYER_PREFIX) :]
            node = node.cpu_parent
        if node.name != ITERATION:
            continue
        own = event.self_device_time_total if device_time else event.self_cpu_time_total
        bucket = per_root.setdefault(node.id, {})
        starts[node.id] = node.time_range.start
        name = layer or OTHER
        bucket[name] = bucket.get(name, 0.0) + own / 1e6  # the profiler counts microseconds
    return [per_root[root] for root in sorted(per_root, key=starts.__getitem__)]


def profile_layers(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    device: torch.device,
    precision: Precision,
    flops: FlopReport,
    pruned: Iterable[str] = (),
    iterations: int = PROFILE_ITERATIONS,
    warmup: int = PROFILE_WARMUP,
) -> LayerProfile:
    """Profile a placed copy of ``module`` (eval mode, on ``device`` in ``precision``; the
    caller's module is untouched) on ``inputs`` (fp32, CPU) under ``torch.inference_mode``.

    ``flops`` is the FLOP report of ``module`` (per image), ``pruned`` the names of the layers
    its pruning spec changed. Raises ConfigError when ``iterations`` < 1.
    """
    if iterations < 1:
        raise ConfigError(f"profile iterations {iterations!r} must be a positive integer")
    placed = copy.deepcopy(module)
    nn.Module.train(placed, False)
    placed = placed.to(device=device, dtype=precision.dtype)
    args = tuple(
        x.to(device=device, dtype=precision.dtype) if x.is_floating_point() else x.to(device)
        for x in inputs
    )
    cuda = device.type == "cuda"

    def run() -> Any:
        with torch.inference_mode():
            return placed(*args)

    counts = {layer.name: layer for layer in flops.layers}
    layers = layer_modules(placed, counts)
    calls, moved = _shape_pass(layers, run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Kineto (the profiler's backend) logs its stages to stderr, and on a CUDA build without
    # a GPU an ERROR line per profile; it reads this when it starts. A user's setting wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    sync()
    unprofiled: list[float] = []
    sessions: list[Any] = []  # read after the last round: no Python work between rounds
    for start in range(0, iterations, ROUND):
        size = min(ROUND, iterations - start)
        unprofiled += _wall_times(run, sync, size)  # without the ranges' hooks: plain inference
        handles = _attach_ranges(layers)
        try:
            with profile(activities=activities) as prof:
                for _ in range(size):
                    with torch.profiler.record_function(ITERATION):
                        run()
                        sync()
        finally:
            for handle in handles:
                handle.remove()
        sessions.append(prof)
    measured = [times for p in sessions for times in attribute(p.events(), device_time=cuda)]
    per_iteration = _middle_half(measured)
    touched = set(pruned)
    rows = []
    for name, layer in layers.items():
        count = counts.get(name)
        rows.append(
            LayerTime(
                name=name,
                kind=type(layer).__name__,
                time_s=_mean(per_iteration, name),
                calls=calls[name],
                macs=count.macs if count else 0,
                nonzero_macs=count.nonzero_macs if count else 0,
                bytes=moved[name],
                pruned=name in touched,
                channels=_channels(layer),
            )
        )
    stray = [c for name, c in counts.items() if name not in layers]  # counted on the root
    rows.append(
        LayerTime(
            name=OTHER,
            kind="functional",
            time_s=_mean(per_iteration, OTHER),
            calls=1,
            macs=sum(c.macs for c in stray),
            nonzero_macs=sum(c.nonzero_macs for c in stray),
            bytes=0,
            pruned=False,
        )
    )
    return LayerProfile(
        layers=tuple(rows),
        iterations=len(measured),
        batch_size=int(args[0].shape[0]) if args and args[0].dim() else 1,
        clock="cuda kernel time" if cuda else "cpu self time",
        unprofiled_s=statistics.median(unprofiled),
    )


def _wall_times(run: Callable[[], Any], sync: Callable[[], None], count: int) -> list[float]:
    """Seconds of each of ``count`` unprofiled inferences, synchronised."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _middle_half(per_iteration: list[dict[str, float]]) -> list[dict[str, float]]:
    """The iterations whose totals are neither in the lowest nor in the highest quarter."""
    ranked = sorted(per_iteration, key=lambda times: sum(times.values()))
    cut = len(ranked) // 4
    return ranked[cut : len(ranked) - cut]


def _mean(per_iteration: list[dict[str, float]], name: str) -> float:
    if not per_iteration:
        return 0.0
    return statistics.fmean(times.get(name, 0.0) for times in per_iteration)
