"""One cell, start to finish: prepare on the target, verify against eager, then time.

``run_cell`` never raises for a problem of the cell itself: a BenchError becomes a failed
record with its one-line reason, any other exception a failed record with its traceback.
Only KeyboardInterrupt (and other BaseExceptions) propagate, so the runner can stop cleanly.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from benchlib import layer_profile
from benchlib.errors import BenchError
from benchlib.harness import gpu
from benchlib.harness.memory import memory_pass
from benchlib.harness.timing import Clock, TimingConfig, first_call, measure
from benchlib.harness.verify import verify
from benchlib.pruning import Variant
from benchlib.results import CellKey, CellRecord, Status
from benchlib.target import DeviceKind, Precision, Target

INPUT_SEED = 0
"""Seed of the example inputs: every target of a variant sees the same numbers."""


def device_for(target: Target) -> torch.device:
    """The torch device a target's cells run on."""
    return torch.device("cuda") if target.device_kind is DeviceKind.CUDA else torch.device("cpu")


def flop_fields(variant: Variant) -> dict[str, int]:
    """Per-image counts stored with every cell of ``variant``: ``pruned_macs`` are the touched
    layers' MACs in the dense model, ``pruned_nonzero_macs`` what of them the variant keeps."""
    touched = set(variant.recipe.layers)
    dense = variant.dense_flops or variant.flops
    return {
        "macs": variant.flops.macs,
        "nonzero_macs": variant.flops.nonzero_macs,
        "params": variant.flops.params,
        "nonzero_params": variant.flops.nonzero_params,
        # the touched layers' MACs before pruning (structured pruning shrinks them) ...
        "pruned_macs": sum(layer.macs for layer in dense.layers if layer.name in touched),
        # ... and the nonzero MACs they keep
        "pruned_nonzero_macs": sum(
            layer.nonzero_macs for layer in variant.flops.layers if layer.name in touched
        ),
    }


def run_cell(
    variant: Variant,
    target: Target,
    key: CellKey,
    *,
    timing: TimingConfig,
    threads: int,
    clock: Clock = time.perf_counter_ns,
    idle_rss_bytes: int | None = None,
    profile_layers: bool = False,
) -> CellRecord:
    """Measure one cell and return its record (ok, failed or skipped).

    Order: prepare (timed: the build/export/compile time); the first call, timed as the cold
    call and verified against eager fp32;
    warm-up and timing; then a separate memory pass (``idle_rss_bytes`` is the worker's RSS
    before it built anything). On CUDA, NVML is sampled before and after. Last, with
    ``profile_layers`` and a target whose ``profiles_layers`` class attribute says it runs the
    module as written (eager), a profiled pass times each layer (``benchlib.layer_profile``),
    apart from the samples.
    """
    start = time.perf_counter()
    device = device_for(target)
    common: dict[str, Any] = {
        "key": key,
        "device": str(device),
        "threads": threads,
        "recipe_sha256": variant.recipe.sha256,
        "flops": flop_fields(variant),
    }
    precision = Precision.parse(key.precision)
    if precision not in target.precisions:
        supported = ", ".join(sorted(p.value for p in target.precisions))
        return CellRecord(
            status=Status.SKIPPED,
            reason=f"{key.target} does not run {precision.value} (it runs: {supported})",
            **common,
        )
    try:
        inputs = (variant.model.example_input(key.batch_size, seed=INPUT_SEED),)
        with torch.no_grad():
            expected = variant.module(*inputs)
        nvml = gpu.nvml_index(device) if device.type == "cuda" else None
        gpu_before = gpu.sample(nvml) if nvml is not None else None
        prepare_start = clock()
        prepared = target.prepare(variant.module, inputs, device, precision)
        prepare_s = (clock() - prepare_start) / 1e9
        output, cold_s = first_call(prepared, clock)
        error = verify(output, expected, precision)
        pool = [
            (
                variant.model.example_input(
                    key.batch_size, seed=INPUT_SEED + k, device=device, dtype=precision.dtype
                ),
            )
            for k in range(timing.rotate_inputs if prepared.rebind is not None else 0)
        ]
        measured = measure(prepared, timing, clock, cold_s=cold_s, device=device, input_pool=pool)
        memory = memory_pass(
            prepared.run, prepared.synchronize, device, rss_idle_bytes=idle_rss_bytes
        )
        gpu_after = gpu.sample(nvml) if nvml is not None else None
        profile = (
            layer_profile.profile_layers(
                variant.module,
                inputs,
                device=device,
                precision=precision,
                flops=variant.flops,
                pruned=variant.recipe.layers,
            ).to_dict()
            if profile_layers and getattr(target, "profiles_layers", False)
            else None
        )
    except BenchError as exc:
        return CellRecord(
            status=Status.FAILED,
            reason=f"{type(exc).__name__}: {exc}",
            duration_s=time.perf_counter() - start,
            **common,
        )
    except Exception as exc:  # a crashing cell must not end the run
        return CellRecord(
            status=Status.FAILED,
            reason=f"crashed: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            duration_s=time.perf_counter() - start,
            **common,
        )
    return CellRecord(
        status=Status.OK,
        samples_s=measured.samples_s,
        loops=measured.loops,
        cold_s=measured.cold_s,
        warmup_runs=measured.warmup_runs,
        max_error=error,
        info=dict(prepared.info),
        prepare_s=prepare_s,
        clock=measured.clock,
        host_s=measured.host_s,
        memory=memory.to_dict(),
        gpu_before=gpu_before.to_dict() if gpu_before else None,
        gpu_after=gpu_after.to_dict() if gpu_after else None,
        layer_profile=profile,
        duration_s=time.perf_counter() - start,
        **common,
    )
