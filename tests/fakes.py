"""Test doubles: a fake clock and fake targets, so the harness is tested with exact numbers."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from benchlib.harness.timing import TimingConfig
from benchlib.suite import Suite
from benchlib.target import DeviceKind, Precision, Prepared


class FakeClock:
    """A nanosecond clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


def timed_prepared(
    clock: FakeClock, durations: Callable[[int], float], output: Any = None
) -> Prepared:
    """A Prepared whose n-th call (0-based) advances ``clock`` by ``durations(n)`` seconds."""
    calls = {"n": 0}

    def run() -> Any:
        clock.advance(durations(calls["n"]))
        calls["n"] += 1
        return output

    return Prepared(run=run, synchronize=lambda: None, info={"fake": True})


class EagerCopyTarget:
    """A CPU target that runs the model eagerly: the simplest correct target. Subclasses
    change what ``runner`` returns (or does) to play the targets that go wrong."""

    name: ClassVar[str] = "fake-eager"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CPU
    precisions: ClassVar[frozenset[Precision]] = frozenset({Precision.FP32})
    exploits_sparsity: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        return None

    def prepare(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        device: torch.device,
        precision: Precision,
    ) -> Prepared:
        return Prepared(run=self.runner(model, inputs), synchronize=lambda: None)

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(*inputs)

        return run


class WrongOutputTarget(EagerCopyTarget):
    """Returns outputs that are off by 10%: must fail the correctness gate."""

    name: ClassVar[str] = "fake-wrong"

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        eager = super().runner(model, inputs)
        return lambda: eager() * 1.1


class CrashingTarget(EagerCopyTarget):
    """Raises an unexpected exception while preparing: a crashing cell."""

    name: ClassVar[str] = "fake-crash"

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        raise RuntimeError("boom")


class FakeGpuTarget(EagerCopyTarget):
    """A CUDA-kind target that is never available."""

    name: ClassVar[str] = "fake-gpu"
    device_kind: ClassVar[DeviceKind] = DeviceKind.CUDA

    def unavailable_reason(self) -> str | None:
        return "no fake GPU here"


class NoWeights(nn.Module):
    """A model with nothing to prune: magnitude pruning must fail its cells, not the run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).mean(dim=(2, 3))


class AbortingTarget(EagerCopyTarget):
    """Aborts the process while preparing (SIGABRT), as a crashing native library would."""

    name: ClassVar[str] = "fake-abort"

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        os.abort()


class HangingTarget(EagerCopyTarget):
    """Never returns from prepare: the cell's time limit must end it."""

    name: ClassVar[str] = "fake-hang"

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        threading.Event().wait()
        raise AssertionError("unreachable")


class MemoryHogTarget(EagerCopyTarget):
    """Asks for far more memory than any machine has."""

    name: ClassVar[str] = "fake-oom"

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        hog = bytearray(1 << 50)  # 1 PiB: refused at once with MemoryError
        raise AssertionError(f"unreachable: got {len(hog)} bytes")


class KillOnThirdPrepare(EagerCopyTarget):
    """SIGKILLs its own process at the third cell: a run killed mid-way (run inline)."""

    name: ClassVar[str] = "fake-eager"

    def __init__(self) -> None:
        self.prepared = 0

    def runner(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
        self.prepared += 1
        if self.prepared == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().runner(model, inputs)


FAST_TIMING = TimingConfig(warmup_runs=1, warmup_s=0.0, min_samples=3, min_time_s=0.0)


def tiny_suite(**changes: Any) -> Suite:
    """A suite of the conftest's TinyNet at 16x16 that measures in milliseconds."""
    fields: dict[str, Any] = {
        "name": "t",
        "models": ("tests.conftest:TinyNet",),
        "specs": ("magnitude:0.5",),
        "targets": ("cpu",),
        "batch_sizes": (1, 2),
        "input_size": 16,
        "timing": FAST_TIMING,
        **changes,
    }
    return Suite(**fields)
