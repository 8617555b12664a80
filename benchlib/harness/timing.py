"""Timing one prepared model: cold call, warm-up, calibration and the sampling loop.

The harness owns all timing; a target supplies only ``run`` and ``synchronize``. The clock is
injected (nanoseconds, ``time.perf_counter_ns`` by default) so tests drive it with a fake.

One *sample* is the wall time of ``loops`` consecutive ``run()`` calls followed by one
``synchronize()``, divided by ``loops``: seconds per inference. ``loops`` is calibrated from
the warm-up so that a sample lasts at least ``min_sample_s``, far above the clock's resolution
(the pyperf and ``torch.utils.benchmark`` approach); a call slower than that gets ``loops = 1``
and so one sample per inference. On CUDA, ``sample_cuda`` times samples with events instead.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchlib.errors import ConfigError
from benchlib.target import Prepared

Clock = Callable[[], int]
"""A monotonic clock returning nanoseconds."""

NS_PER_S = 1_000_000_000
MIN_SAMPLES_ALWAYS = 2


@dataclass(frozen=True, kw_only=True)
class TimingConfig:
    """How long and how often to measure one cell.

    Warm-up runs until both ``warmup_runs`` calls and ``warmup_s`` seconds are done. Sampling
    stops once both ``min_samples`` samples and ``min_time_s`` seconds are reached, or at
    ``max_samples`` samples, or at ``max_time_s`` seconds even short of ``min_samples`` (for
    very slow calls; at least two samples are always taken, and the verdict flags the cell).
    ``rotate_inputs`` > 1 cycles the samples through that many input sets (trtexec's rotating
    buffers) where the target can rebind its inputs; ``cuda_graphs`` replays a captured graph.
    """

    warmup_runs: int = 3
    warmup_s: float = 0.2
    min_samples: int = 10
    min_time_s: float = 1.0
    max_samples: int = 10_000
    max_time_s: float = 60.0
    min_sample_s: float = 1e-3
    cuda_graphs: bool = False
    rotate_inputs: int = 1

    def __post_init__(self) -> None:
        checks = {
            "warmup_runs": self.warmup_runs >= 0,
            "warmup_s": self.warmup_s >= 0,
            "min_samples": self.min_samples >= 1,
            "min_time_s": self.min_time_s >= 0,
            "max_samples": self.max_samples >= self.min_samples,
            "max_time_s": self.max_time_s >= self.min_time_s,
            "min_sample_s": self.min_sample_s >= 0,
            "rotate_inputs": self.rotate_inputs >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"timing option {name}={getattr(self, name)!r} is out of range")


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Raw result of ``measure``: per-inference samples in seconds, plus how they were taken.

    On CUDA the samples are device times from CUDA events and ``host_s`` is the host's
    end-to-end time per inference over the whole sampling phase (enqueue to final sync).
    """

    samples_s: tuple[float, ...]
    loops: int
    cold_s: float
    warmup_runs: int
    warmup_s: float
    total_s: float
    clock: str = "host"
    host_s: float | None = None


def first_call(prepared: Prepared, clock: Clock = time.perf_counter_ns) -> tuple[Any, float]:
    """The cold first call (lazy initialisation, JIT profiling): its output and seconds."""
    begin = clock()
    output = prepared.run()
    prepared.synchronize()
    return output, (clock() - begin) / NS_PER_S


def measure(
    prepared: Prepared,
    config: TimingConfig,
    clock: Clock = time.perf_counter_ns,
    *,
    cold_s: float | None = None,
    device: torch.device | None = None,
    input_pool: Sequence[tuple[torch.Tensor, ...]] = (),
) -> Timing:
    """Time ``prepared.run`` under ``config``.

    On the CPU every sample ends with ``synchronize()`` and is timed by ``clock``. On a CUDA
    ``device`` samples are timed by CUDA events recorded on the current stream, with no
    synchronize inside the timed loop (one at the end), optionally replaying a CUDA graph of
    one call (``config.cuda_graphs``). ``cold_s`` is the first call when the caller already made
    it (with ``first_call``, to verify its output); otherwise ``measure`` makes it. The garbage
    collector is collected before and disabled during sampling (as timeit and pyperf do).
    ``input_pool``: input sets to rotate through, one per sample, bound with
    ``prepared.rebind`` before the sample's clock starts (ignored when the target cannot).
    """
    begin = clock()
    made_before = 0.0 if cold_s is None else cold_s
    if cold_s is None:
        _, cold_s = first_call(prepared, clock)
    cold_ns = round(cold_s * NS_PER_S)

    warm_start = clock()
    warm_runs = 0
    while warm_runs < config.warmup_runs or clock() - warm_start < config.warmup_s * NS_PER_S:
        prepared.run()
        prepared.synchronize()
        warm_runs += 1
    warm_ns = clock() - warm_start

    per_call_ns = warm_ns / warm_runs if warm_runs else cold_ns
    loops = max(1, math.ceil(config.min_sample_s * NS_PER_S / max(per_call_ns, 1)))

    cuda = device if device is not None and device.type == "cuda" else None
    # A CUDA graph replays the buffers it captured: rebinding would change nothing.
    rotate = _rotation(prepared, () if cuda is not None and config.cuda_graphs else input_pool)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda is not None:
            timed = graphed(prepared, cuda) if config.cuda_graphs else prepared
            samples, host_s = sample_cuda(timed, config, clock, loops, cuda, rotate)
        else:
            samples, host_s = _sample(prepared, config, clock, loops, rotate), None
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(
        samples_s=samples,
        loops=loops,
        cold_s=cold_s,
        warmup_runs=warm_runs,
        warmup_s=warm_ns / NS_PER_S,
        total_s=(clock() - begin) / NS_PER_S + made_before,
        clock="host"
        if cuda is None
        else "cuda events" + (" (graph)" if config.cuda_graphs else ""),
        host_s=host_s,
    )


def _rotation(
    prepared: Prepared, pool: Sequence[tuple[torch.Tensor, ...]]
) -> Callable[[int], None]:
    """A function that binds input set ``i mod len(pool)`` (a no-op without a pool)."""
    rebind = prepared.rebind
    if rebind is None or len(pool) < 2:
        return lambda i: None
    return lambda i: rebind(pool[i % len(pool)])


def _sample(
    prepared: Prepared,
    config: TimingConfig,
    clock: Clock,
    loops: int,
    rotate: Callable[[int], None],
) -> tuple[float, ...]:
    """The timed loop: seconds per inference, one value per sample, until the stop rule."""
    samples: list[float] = []
    sampling_start = clock()
    while True:
        rotate(len(samples))
        t0 = clock()
        for _ in range(loops):
            prepared.run()
        prepared.synchronize()
        samples.append((clock() - t0) / loops / NS_PER_S)
        if stop(config, len(samples), (clock() - sampling_start) / NS_PER_S):
            return tuple(samples)


def stop(config: TimingConfig, samples: int, elapsed_s: float) -> bool:
    """The stop rule: enough samples and time, or the caps."""
    if samples >= config.max_samples:
        return True
    if samples >= config.min_samples and elapsed_s >= config.min_time_s:
        return True
    return elapsed_s >= config.max_time_s and samples >= MIN_SAMPLES_ALWAYS


def sample_cuda(
    prepared: Prepared,
    config: TimingConfig,
    clock: Clock,
    loops: int,
    device: torch.device,
    rotate: Callable[[int], None],
) -> tuple[tuple[float, ...], float]:
    """Device seconds per inference from event pairs around each sample, and the host's
    end-to-end seconds per inference. The host clock drives the stop rule; the events are
    read after the one final synchronize, so nothing in the loop waits for the device."""
    stream = torch.cuda.current_stream(device)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    sampling_start = clock()
    while True:
        rotate(len(events))
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record(stream)
        for _ in range(loops):
            prepared.run()
        end.record(stream)
        events.append((start, end))
        if stop(config, len(events), (clock() - sampling_start) / NS_PER_S):
            break
    prepared.synchronize()
    host_s = (clock() - sampling_start) / NS_PER_S / (len(events) * loops)
    samples = tuple(start.elapsed_time(end) / 1e3 / loops for start, end in events)
    return samples, host_s


def graphed(prepared: Prepared, device: torch.device, warmups: int = 3) -> Prepared:
    """``prepared`` with one call captured into a CUDA graph, replayed by ``run``.

    Warm-up runs on a side stream first, as torch's CUDA-graph documentation asks."""
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            prepared.run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prepared.run()
    return Prepared(
        run=graph.replay,
        synchronize=prepared.synchronize,
        info={**prepared.info, "cuda_graph": True},
    )
