"""The environment fingerprint and the one place that sets threads."""

from __future__ import annotations

import json

import pytest
import torch

from benchlib.errors import ConfigError
from benchlib.harness.environment import apply_threads, default_threads, fingerprint


def test_fingerprint_names_the_machine_and_software() -> None:
    facts = fingerprint(threads=2)
    json.dumps(facts)  # stored in run.json as is
    assert facts["cpu"]["threads"] == 2
    assert facts["cpu"]["model"]
    assert facts["versions"]["torch"] == torch.__version__.split("+")[0]
    assert facts["versions"]["python"]
    assert "tensorrt" in facts["versions"] and "onnxruntime" in facts["versions"]
    if not torch.cuda.is_available():
        assert facts["gpus"] == []


def test_apply_threads_sets_torch_and_rejects_nonsense() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        assert apply_threads(None) == default_threads()
        with pytest.raises(ConfigError, match="--threads must be a positive integer, got 0"):
            apply_threads(0)
    finally:
        torch.set_num_threads(before)
