"""CUDA timing: events on the stream, CUDA graphs. Runs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from benchlib.harness.timing import TimingConfig, measure
from benchlib.target import Prepared

pytestmark = pytest.mark.gpu


def matmul_prepared() -> Prepared:
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    out = torch.empty_like(a)

    def run() -> torch.Tensor:
        return torch.mm(a, a, out=out)

    return Prepared(run=run, synchronize=lambda: torch.cuda.synchronize(device))


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_events_time_the_device_and_agree_with_the_host(graphs: bool) -> None:
    cfg = TimingConfig(warmup_runs=5, min_samples=20, min_time_s=0.2, cuda_graphs=graphs)
    timing = measure(matmul_prepared(), cfg, device=torch.device("cuda"))
    assert timing.clock == ("cuda events (graph)" if graphs else "cuda events")
    assert len(timing.samples_s) >= 20
    median = sorted(timing.samples_s)[len(timing.samples_s) // 2]
    assert median > 0 and timing.host_s is not None
    # a 2048^3 matmul is device-bound: host end-to-end per call within 30% of the device time
    assert timing.host_s == pytest.approx(median, rel=0.3)
