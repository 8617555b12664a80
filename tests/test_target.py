"""The registry: lazy loading, selectors, and errors that list the choices."""

from __future__ import annotations

import pytest

from benchlib.errors import ConfigError, TargetUnavailable
from benchlib.target import Precision, TargetRegistry
from tests.fakes import EagerCopyTarget, FakeGpuTarget


def registry() -> TargetRegistry:
    return TargetRegistry(
        {
            "fake-eager": EagerCopyTarget,
            "fake-gpu": FakeGpuTarget,
            "broken": "no_such_module_xyz:Target",
        }
    )


def test_cpu_selector_expands_to_available_cpu_targets() -> None:
    selection = registry().select(["cpu"])
    assert selection.targets == ("fake-eager",)
    assert selection.skipped == {
        "broken": "cannot load 'no_such_module_xyz:Target': No module named 'no_such_module_xyz'"
    }


def test_gpu_selector_without_gpu_skips_with_reason_and_keeps_cpu() -> None:
    selection = registry().select(["gpu", "cpu"])
    assert selection.targets == ("fake-eager",)
    assert selection.skipped["fake-gpu"] == "no fake GPU here"


def test_only_unavailable_targets_is_an_error_with_the_reasons() -> None:
    with pytest.raises(ConfigError, match=r"no target to run: .*fake-gpu: no fake GPU here"):
        TargetRegistry({"fake-gpu": FakeGpuTarget}).select(["gpu"])


def test_unknown_target_lists_the_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown target 'fake-eagr'; choose from: broken, cpu, "
        r"fake-eager, fake-gpu, gpu \(did you mean 'fake-eager'\?\)",
    ):
        registry().select(["fake-eagr"])


def test_naming_an_unavailable_target_raises_target_unavailable() -> None:
    with pytest.raises(TargetUnavailable) as info:
        registry().select(["fake-gpu"])
    assert info.value.reason == "no fake GPU here"


def test_duplicates_are_dropped_in_order() -> None:
    assert registry().select(["fake-eager", "cpu"]).targets == ("fake-eager",)


def test_precision_parse() -> None:
    assert Precision.parse(" FP16 ") is Precision.FP16
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; choose from: bf16, fp16, fp32"):
        Precision.parse("fp8")


class ExplodingTarget(EagerCopyTarget):
    def __init__(self) -> None:
        raise RuntimeError("driver missing")


class NotATarget:
    pass


def test_a_broken_third_party_target_is_skipped_with_its_reason() -> None:
    registry = TargetRegistry(
        {"fake-eager": EagerCopyTarget, "boom": ExplodingTarget, "odd": NotATarget}
    )  # type: ignore[dict-item]
    selection = registry.select(["cpu"])
    assert selection.targets == ("fake-eager",)
    assert "driver missing" in selection.skipped["boom"]
    assert "does not implement the Target protocol" in selection.skipped["odd"]
