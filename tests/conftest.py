"""Shared fixtures: tiny models that run in milliseconds, and the native sparse kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchlib.models import Model


class TinyNet(nn.Module):
    """conv -> bn -> relu -> conv -> relu -> pool -> linear: three weight layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="session")
def native_kernels() -> None:
    """Build (or load) benchlib's native sparse kernels once; skip only where there is no
    compiler at all: with a compiler, a failing build fails the tests. A module of native
    tests asks for it with ``pytestmark = pytest.mark.usefixtures("native_kernels")``."""
    from benchlib.sparse import NativeUnavailable, load_library
    from benchlib.sparse.build import compiler

    loaded = load_library()
    if isinstance(loaded, NativeUnavailable):
        if compiler() is None:
            pytest.skip(f"no C++ compiler: {loaded.reason}")
        pytest.fail(f"the native kernels did not build: {loaded.reason}")


@pytest.fixture
def tiny_model() -> Model:
    torch.manual_seed(0)
    return Model(name="tiny", module=TinyNet().eval(), input_shape=(3, 16, 16), source="factory")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip marked tests with their reason: slow (without --slow), gpu, tensorrt."""
    reasons = {}
    if not config.getoption("--slow"):
        reasons["slow"] = "slow test: run with --slow"
    if not torch.cuda.is_available():
        reasons["gpu"] = "needs a CUDA GPU: torch.cuda.is_available() is False"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reasons["tensorrt"] = "needs TensorRT (the tensorrt package is not installed)"
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
