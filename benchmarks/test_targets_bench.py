"""pytest-benchmark timings of ``Prepared`` objects from every registered target.

Run with ``pytest benchmarks/ --benchmark-only`` (``python -m pytest`` collects ``tests/``
only). ResNet-20 (CIFAR, 32x32), dense and ``magnitude:0.9``, batch sizes 1 and 8, fp32, on
each target of ``TargetRegistry.from_entry_points()``; a target that cannot run here is skipped
with its own reason. The target builds the model and pytest-benchmark times it: there is no
timing code here. Every cell first passes the correctness gate (outputs against eager fp32 within
the fp32 tolerance), as in ``bench run``. Threads are torch's default, recorded in
``extra_info``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from benchlib.harness.verify import verify
from benchlib.models import build_model
from benchlib.pruning import Variant, prune
from benchlib.target import DeviceKind, Precision, TargetRegistry

MODEL = "resnet20"
SPECS = ("dense", "magnitude:0.9")
BATCH_SIZES = (1, 8)
PRECISION = Precision.FP32
ROUNDS = 20
WARMUP_ROUNDS = 3


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize over every registered target (names only: no target module is imported)."""
    if "target_name" in metafunc.fixturenames:
        metafunc.parametrize("target_name", TargetRegistry.from_entry_points().names())


@pytest.fixture(scope="module")
def registry() -> TargetRegistry:
    return TargetRegistry.from_entry_points()


@pytest.fixture(scope="module")
def variants() -> dict[str, Variant]:
    """Every spec of ``SPECS`` applied to the same seeded ``MODEL``."""
    model = build_model(MODEL)
    return {spec: prune(model, spec) for spec in SPECS}


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("spec", SPECS)
def test_target(
    benchmark: BenchmarkFixture,
    registry: TargetRegistry,
    variants: dict[str, Variant],
    target_name: str,
    spec: str,
    batch_size: int,
) -> None:
    target = registry.get(target_name)
    reason = target.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{target_name}: {reason}")
    if PRECISION not in target.precisions:
        pytest.skip(f"{target_name} does not run {PRECISION.value}")
    device = torch.device("cuda" if target.device_kind is DeviceKind.CUDA else "cpu")
    variant = variants[spec]
    inputs = (variant.model.example_input(batch_size),)
    with torch.inference_mode():
        expected = variant.module(*inputs)
    prepared = target.prepare(variant.module, inputs, device, PRECISION)
    error = verify(prepared.run(), expected, PRECISION)

    def once() -> Any:
        output = prepared.run()
        prepared.synchronize()
        return output

    benchmark.group = f"{MODEL} {target_name} bs{batch_size}"
    benchmark.extra_info.update(
        {
            "model": MODEL,
            "spec": spec,
            "target": target_name,
            "device_kind": target.device_kind.value,
            "exploits_sparsity": target.exploits_sparsity,
            "precision": PRECISION.value,
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "macs_per_image": variant.flops.macs,
            "nonzero_macs_per_image": variant.flops.nonzero_macs,
            "relative_error": error,
            "prepared": dict(prepared.info),
        }
    )
    benchmark.pedantic(  # type: ignore[no-untyped-call]
        once, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )
