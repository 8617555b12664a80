"""Diagnosis on crafted profiles (exact numbers, every tag) and the ``bench explain`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchlib.cli_explain import explain_command
from benchlib.diagnosis import Explanation, explain, explain_run, profiled_baseline
from benchlib.layer_profile import OTHER, LayerProfile, LayerTime
from benchlib.results import RESULTS_FILE, RUN_FILE, CellKey, CellRecord, Status, append_record

GOLDEN = Path(__file__).parent / "data" / "explain_l1.txt"

# name: (kind, MACs, nonzero MACs, seconds, bytes, channels, pruned); batch 1
DENSE = {
    "conv1": ("Conv2d", 1000, 1000, 0.010, 100, (3, 16), False),
    "a": ("Conv2d", 4000, 4000, 0.040, 400, (16, 16), False),
    "b": ("Conv2d", 4000, 4000, 0.040, 400, (16, 16), False),
    "bn": ("BatchNorm2d", 0, 0, 0.010, 1000, None, False),
    "tiny": ("Linear", 400, 400, 50e-6, 40, (16, 16), False),
    "m": ("Conv2d", 2000, 2000, 0.020, 200, (16, 16), False),
    OTHER: ("functional", 0, 0, 0.002, 0, None, False),
}
VARIANT = {
    "conv1": ("Conv2d", 1000, 1000, 0.010, 100, (3, 16), False),  # left dense
    "a": ("Conv2d", 1000, 1000, 0.030, 250, (16, 6), True),  # misaligned and thin
    "b": ("Conv2d", 1000, 1000, 0.008, 250, (16, 8), True),  # faster than its F
    "bn": ("BatchNorm2d", 0, 0, 0.009, 500, None, True),  # no MACs
    "tiny": ("Linear", 100, 100, 45e-6, 20, (16, 4), True),  # overhead
    "m": ("Conv2d", 2000, 200, 0.020, 200, (16, 16), True),  # masked: 90% zeros
    OTHER: ("functional", 0, 0, 0.002, 0, None, False),
}


def profile(
    layers: dict[str, tuple[Any, ...]], unprofiled_s: float | None = None
) -> dict[str, Any]:
    return LayerProfile(
        layers=tuple(
            LayerTime(
                name=name,
                kind=kind,
                time_s=seconds,
                calls=1,
                macs=macs,
                nonzero_macs=nonzero,
                bytes=moved,
                pruned=pruned,
                channels=channels,
            )
            for name, (kind, macs, nonzero, seconds, moved, channels, pruned) in layers.items()
        ),
        iterations=10,
        batch_size=1,
        clock="cpu self time",
        unprofiled_s=unprofiled_s,
    ).to_dict()


def cell(
    spec: str,
    layers: dict[str, tuple[Any, ...]] | None,
    median: float,
    *,
    target: str = "torch-eager",
    repeat: int = 0,
    info: dict[str, Any] | None = None,
    unprofiled_s: float | None = None,
) -> CellRecord:
    source = layers or (DENSE if spec == "dense" else VARIANT)
    return CellRecord(
        key=CellKey(
            model="net", spec=spec, target=target, batch_size=1, precision="fp32", repeat=repeat
        ),
        status=Status.OK,
        device="cpu",
        samples_s=(median * 0.99, median, median * 1.01),
        flops={
            "macs": sum(v[1] for v in source.values()),
            "nonzero_macs": sum(v[2] for v in source.values()),
        },
        info=info or {},
        layer_profile=profile(layers, unprofiled_s) if layers else None,
    )


def explained() -> Explanation:
    return explain(cell("l1:0.5", VARIANT, 0.080), cell("dense", DENSE, 0.118))


def test_per_layer_realization_and_lost_time_are_exact() -> None:
    found = explained()
    layers = {f.name: f for f in found.layers}
    assert [f.name for f in found.layers] == [*VARIANT]
    assert found.flops_ratio == pytest.approx(11400 / 3300)
    a = layers["a"]
    assert (a.flops_ratio, a.speedup) == pytest.approx((4.0, 0.040 / 0.030))
    assert a.realization == pytest.approx((1 - 0.030 / 0.040) / (1 - 1 / 4))
    assert a.expected_s == pytest.approx(0.010) and a.lost_s == pytest.approx(0.020)
    assert a.mac_share == pytest.approx(1000 / 3300)
    assert a.time_share == pytest.approx(0.030 / found.variant_total_s)
    assert (a.dense_intensity, a.variant_intensity) == pytest.approx((20.0, 8.0))
    # no MACs: expected to shrink like the whole model
    assert layers["bn"].expected_s == pytest.approx(0.010 / (11400 / 3300))
    assert layers["bn"].flops_ratio is None and layers["bn"].realization is None
    assert [f.name for f in found.held_back] == ["a", "m", "bn", OTHER, "tiny"]
    assert found.coverage == pytest.approx(found.variant_total_s / 0.080)
    assert found.dense_median_s == pytest.approx(0.118)


def test_each_mechanism_tags_its_layer() -> None:
    tags = {f.name: f.tags for f in explained().layers}
    assert tags["conv1"] == ("left dense",)
    assert tags["a"] == ("channels 6 not a multiple of 8", "thin (20->8 FLOP/B)")
    assert tags["b"] == ("T>F: cache effect",)
    assert tags["bn"] == ("memory-bound (no MACs)",)
    assert tags["tiny"] == ("per-op overhead",)
    assert tags["m"] == ("masked, not removed (90% zeros)",)
    assert tags[OTHER] == ()


def test_cell_findings_state_the_numbers_they_rest_on() -> None:
    found = explained()
    text = "\n".join(found.findings)
    total = found.variant_total_s
    assert f"hold {0.009 / total:.0%} of the time and 0.0% of the MACs" in text
    assert "per-op overhead: 1 layer under 100 us" in text
    assert (
        f"unpruned layers (Amdahl): 1 layer the spec left dense (conv1) hold {0.01 / total:.0%}"
        in text
    )
    assert f"alone they cap T at {found.dense_total_s / 0.010:.1f}x" in text
    assert "channels not a multiple of 8 (alignment): 1 layer (a)" in text
    assert "thin layers: arithmetic intensity fell: 1 layer (a)" in text
    assert "T > F: cache effect: 1 layer (b)" in text
    assert "masked" not in text  # 1800 of 8100 removed MACs are masked zeros: under half


def test_a_masked_variant_says_its_zeros_are_still_multiplied() -> None:
    masked = {**DENSE, "m": ("Conv2d", 2000, 200, 0.020, 200, (16, 16), True)}
    found = explain(cell("magnitude:0.9", masked, 0.12), cell("dense", DENSE, 0.118))
    assert any(
        line.startswith("masked, not removed: 100% of the removed MACs are zeros")
        for line in found.findings
    )


def test_the_quieter_dense_profile_is_the_baseline() -> None:
    # the opening dense cell ran under interference (3x slower); its repeat after the
    # variants did not: the variant is explained against the repeat
    slow = {name: (*v[:3], v[3] * 3, *v[4:]) for name, v in DENSE.items()}
    records = [
        cell("dense", slow, 0.354, unprofiled_s=0.350),
        cell("l1:0.5", VARIANT, 0.080, unprofiled_s=0.081),
        cell("dense", DENSE, 0.118, repeat=1, unprofiled_s=0.117),
    ]
    assert profiled_baseline(records, records[1].key) is records[2]
    (found,) = explain_run(records)
    assert found.dense_total_s == pytest.approx(sum(v[3] for v in DENSE.values()))
    # a profile without its unprofiled latency (an older run) counts as the slowest
    records[2] = cell("dense", DENSE, 0.118, repeat=1)
    assert profiled_baseline(records, records[1].key) is records[0]
    assert profiled_baseline(records[1:2], records[1].key) is None


def write_run(directory: Path, records: list[CellRecord]) -> Path:
    directory.mkdir()
    environment = {"cpu": {"model": "AMD EPYC"}, "gpus": []}
    (directory / RUN_FILE).write_text(json.dumps({"environment": environment}))
    for record in records:
        append_record(directory / RESULTS_FILE, record)
    return directory


SPARSE_INFO = {"layers": [{"name": "m", "sparse": True, "format": "csr"}]}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "run",
        [
            cell("dense", DENSE, 0.118),
            cell("l1:0.5", VARIANT, 0.080),
            cell("dense", None, 0.119, repeat=1),
            cell("dense", None, 0.100, target="cpu-sparse"),
            cell("l1:0.5", None, 0.125, target="cpu-sparse", info=SPARSE_INFO),
        ],
    )


def invoke(*args: str) -> Any:
    return CliRunner().invoke(explain_command, list(args), env={"COLUMNS": "120"})


def test_explain_prints_the_diagnosis_and_the_layer_table(run_dir: Path) -> None:
    result = invoke(str(run_dir), "--model", "net", "--spec", "l1:0.5", "--target", "torch-eager")
    assert result.exit_code == 0, result.output
    if os.environ.get("BENCHLIB_UPDATE_GOLDEN"):
        GOLDEN.write_text(result.output)
    assert result.output == GOLDEN.read_text()
    assert "roofline share n/a" in result.output


def test_explain_of_an_unprofiled_target_gives_the_cell_findings(run_dir: Path) -> None:
    result = invoke(str(run_dir), "--model", "net", "--spec", "l1:0.5", "--target", "cpu-sparse")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "sparse format below break-even: 1 layers ran sparse (csr) and the cell is 1.25x" in text
    assert "profiled in this run: torch-eager" in text


def test_explain_writes_the_plot(run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "layers.png"
    result = invoke(
        str(run_dir),
        "--model",
        "net",
        "--spec",
        "l1:0.5",
        "--target",
        "torch-eager",
        "--plot",
        str(path),
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "nte"), "error: unknown model 'nte'; choose from: net (did you mean 'net'?)"),
        (("--spec", "fpgm:0.5"), "error: unknown spec 'fpgm:0.5'; choose from: dense, l1:0.5"),
        (("--target", "onnxruntime"), "choose from: cpu-sparse, torch-eager"),
        (("--batch-size", "8"), "error: unknown batch size '8'; choose from: 1"),
    ],
)
def test_a_name_not_in_the_run_lists_the_choices(
    run_dir: Path, args: tuple[str, str], message: str
) -> None:
    given = {"--model": "net", "--spec": "l1:0.5", "--target": "torch-eager"}
    given.update([args])
    flat = [part for pair in given.items() for part in pair]
    result = invoke(str(run_dir), *flat)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.splitlines()) == 1


def test_a_run_without_profiles_says_how_to_get_them(tmp_path: Path) -> None:
    plain = write_run(tmp_path / "plain", [cell("dense", None, 0.1)])
    result = invoke(str(plain), "--model", "net", "--spec", "dense", "--target", "torch-eager")
    assert result.exit_code == 2
    assert result.output.strip().endswith(
        "has no layer profile; run it with bench run --profile-layers"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(str(empty), "--model", "net", "--spec", "dense", "--target", "torch-eager")
    assert result.exit_code == 2 and "is not a run folder with results" in result.output
