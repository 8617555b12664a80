"""Cell records: exact JSON round trip, crash-safe appends, versioned schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchlib.errors import ConfigError
from benchlib.results import CellKey, CellRecord, Status, append_record, read_records

GOLDEN = Path(__file__).parent / "data" / "cell_record_v1.json"


def sample_record() -> CellRecord:
    return CellRecord(
        key=CellKey(
            model="resnet18",
            spec="magnitude:0.9",
            target="torch-eager",
            batch_size=8,
            precision="fp32",
        ),
        status=Status.OK,
        device="cpu",
        samples_s=(0.25, 0.26, 0.24),
        loops=1,
        cold_s=0.5,
        warmup_runs=3,
        max_error=1e-6,
        threads=2,
        recipe_sha256="ab",
        flops={"macs": 10, "nonzero_macs": 2, "params": 5, "nonzero_params": 1},
        info={"engine": "torch"},
        duration_s=3.5,
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_record(path, sample_record())
    append_record(path, sample_record())
    assert list(read_records(path)) == [sample_record(), sample_record()]


def test_version_one_fixture_still_loads() -> None:
    assert CellRecord.from_dict(json.loads(GOLDEN.read_text())) == sample_record()


def test_a_torn_last_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_record(path, sample_record())
    with path.open("a") as handle:
        handle.write('{"key": {"mod')
    assert len(list(read_records(path))) == 1
    with path.open("a") as handle:
        handle.write("\n")
    append_record(path, sample_record())
    with pytest.raises(ConfigError, match="not valid JSON"):
        list(read_records(path))


def test_unknown_schema_version_is_rejected() -> None:
    data = sample_record().to_dict() | {"schema_version": 99}
    with pytest.raises(ConfigError, match="schema_version 99 is not supported; choose from: 1"):
        CellRecord.from_dict(data)
