"""`bench prune` and save_pruned: a pruned TorchScript archive, its recipe, and a run of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import benchlib
from benchlib.archive import archive_metadata, recipe_path, save_pruned
from benchlib.cli import _synthetic_lines, bench
from benchlib.errors import VerificationError
from benchlib.flops import count
from benchlib.loading import load_model
from benchlib.models import Model, build_model
from benchlib.pruning import Recipe, prune, replay
from benchlib.results import CellKey, CellRecord, Status

FAST_SUITE = """
models = ["resnet20"]
specs = ["dense"]
targets = ["torch-eager"]
batch_sizes = [1]
[timing]
warmup_runs = 1
warmup_s = 0.0
min_samples = 3
min_time_s = 0.0
"""


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "160"}).invoke(bench, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def fast_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "fast.toml"
    path.write_text(FAST_SUITE)
    return path


@pytest.fixture(scope="module")
def l1_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """resnet20 pruned by l1:0.5 with `bench prune`, and what the command printed."""
    out = tmp_path_factory.mktemp("pruned") / "r20-l1.pt"
    code, output = invoke("prune", "resnet20", "--spec", "l1:0.5", "--out", str(out))
    assert code == 0, output
    return out, output


def test_prune_writes_an_archive_that_matches_the_pruned_model(
    l1_archive: tuple[Path, str],
) -> None:
    path, _ = l1_archive
    expected = prune(build_model("resnet20"), "l1:0.5")
    loaded = load_model(str(path))
    assert loaded.source == "torchscript"
    assert loaded.input_shape == (3, 32, 32)
    x = loaded.example_input(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), expected.module(x), rtol=1e-4, atol=1e-5)
    # the archive counts (op by op, on the TorchScript graph) as the pruned eager module does
    assert count(loaded.module, loaded.example_input(1)).macs == expected.flops.macs
    meta = archive_metadata(path)
    assert meta is not None
    assert meta["spec"] == "l1:0.5" and meta["model"] == "resnet20"
    assert meta["recipe_sha256"] == expected.recipe.sha256
    assert "synthetic" not in meta  # l1 ranks on weights, no data


def test_recipe_beside_the_archive_replays_to_the_saved_network(
    l1_archive: tuple[Path, str],
) -> None:
    path, _ = l1_archive
    recipe_file = path.with_name("r20-l1.recipe.json")
    data = json.loads(recipe_file.read_text())
    assert data["spec"] == "l1:0.5" and data["schema_version"] == 1
    assert data["details"]["criterion"] == "l1"
    assert data["details"]["allocation"] == "uniform"
    # every group keeps int-rounded half of its channels: 16 -> 8, 32 -> 16, 64 -> 32
    sizes = data["details"]["sizes"]
    assert {k: len(v) for k, v in data["details"]["kept"].items()} == {
        k: n - int(0.5 * n) for k, n in sizes.items()
    }
    rebuilt = replay(build_model("resnet20"), Recipe.load(recipe_file))
    archive = load_model(str(path))
    x = archive.example_input(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(archive.module(x), rebuilt.module(x), rtol=1e-4, atol=1e-5)


def test_prune_prints_the_summary(l1_archive: tuple[Path, str]) -> None:
    path, output = l1_archive
    dense = build_model("resnet20")
    pruned = prune(dense, "l1:0.5")
    before = count(dense.module, dense.example_input(1))
    lines = output.splitlines()
    assert lines[0] == "pruned resnet20 by l1:0.5"
    assert lines[1] == "  channel groups cut: 9 of 9 (uniform allocation); layers changed: 27"
    macs_drop = 100 * (pruned.flops.macs - before.macs) / before.macs
    assert lines[2] == f"  MACs per image:  40.55 M -> 20.5 M ({macs_drop:+.1f}%)"
    assert lines[3] == "  params:          269.7 k -> 135.8 k (-49.7%)"
    assert f"  wrote {path} (TorchScript, input 3x32x32)" in lines
    assert f"  wrote {recipe_path(path)} (recipe)" in lines
    assert "SYNTHETIC" not in output and "calibration data" not in output


def test_bench_run_measures_the_saved_file(
    l1_archive: tuple[Path, str], fast_suite: Path, tmp_path: Path
) -> None:
    path, _ = l1_archive
    code, output = invoke(
        "run", "--suite", str(fast_suite), "--models", str(path),
        "--targets", "torch-eager", "--batch-sizes", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, output
    (run_dir,) = tmp_path.iterdir()
    (record,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok", record
    assert record["key"]["model"] == str(path)
    assert len(record["samples_s"]) >= 3
    assert record["flops"]["macs"] == prune(build_model("resnet20"), "l1:0.5").flops.macs
    assert "SYNTHETIC" not in output


def test_synthetic_calibration_is_labelled_in_prune_and_run(
    fast_suite: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r20-hrank.pt"
    spec = "hrank:0.3[batch_size=8]"  # the default data (synthetic); fewer images, faster
    code, output = invoke("prune", "resnet20", "--spec", spec, "--out", str(out))
    assert code == 0, output
    assert "  calibration data: synthetic (seed 0), 8 images" in output.splitlines()
    warning = [line for line in output.splitlines() if "SYNTHETIC" in line]
    assert warning == [
        "WARNING: SYNTHETIC calibration data: hrank ranked the channels on random images, "
        "not a dataset; pass --data digits or --data FOLDER"
    ]
    meta = archive_metadata(out) or {}
    assert meta["synthetic"] is True and meta["calibration_data"] == "synthetic (seed 0)"
    code, output = invoke(
        "run", "--suite", str(fast_suite), "--models", str(out), "--no-isolation",
        "--out", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 0, output
    assert (
        f"warning {out}: pruned by {spec} with SYNTHETIC calibration data "
        "(random images, not a dataset)"
    ) in output.splitlines()


def test_data_digits_is_real_calibration(tmp_path: Path) -> None:
    out = tmp_path / "r20-taylor.pt"
    code, output = invoke(
        "prune", "resnet20", "--spec", "taylor:0.3[batch_size=16]", "--data", "digits",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert output.splitlines()[0] == "pruned resnet20 by taylor:0.3[batch_size=16,data=digits]"
    assert "  calibration data: digits, 16 images" in output.splitlines()
    assert "SYNTHETIC" not in output
    recipe = Recipe.load(recipe_path(out))
    assert recipe.details["data"] == "digits" and recipe.details["synthetic"] is False
    assert (archive_metadata(out) or {})["synthetic"] is False


def _record(model: str, spec: str, status: Status = Status.OK) -> CellRecord:
    key = CellKey(model=model, spec=spec, target="torch-eager", batch_size=1, precision="fp32")
    return CellRecord(key=key, status=status, reason="" if status is Status.OK else "boom")


def test_run_labels_exactly_the_specs_ranked_on_synthetic_data() -> None:
    records = [
        _record("resnet20", spec)
        for spec in ("dense", "l1:0.5", "hrank:0.3", "hrank:0.3", "taylor:0.3[data=synthetic]",
                     "taylor:0.3[data=digits]", "hrank:0.3[data=/data/cifar]")
    ]  # fmt: skip
    records.append(_record("resnet20", "hrank:0.2", Status.FAILED))  # never measured
    lines = _synthetic_lines(records)
    assert [line.split(": pruned with SYNTHETIC calibration data")[0] for line in lines] == [
        "hrank:0.3",
        "taylor:0.3[data=synthetic]",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", "l9:0.5"], "error: unknown pruning method 'l9'; choose from: "),
        (["--spec", "l1:1.5"], "error: amount 1.5 in spec 'l1:1.5' is outside (0, 1)"),
        (["--spec", "l1:0.5[foo=1]"], "error: unknown option 'foo'; choose from: batch_size, "),
        (["--spec", "fpgm:0.5[round_to=0]"], "error: option round_to='0' in spec "),
        (["--spec", "hrank:0.5[config=nope]"], "error: per-layer config 'nope' (spec "),
        (
            ["--spec", "l1:0.5", "--data", "digits"],
            "error: --data applies only to the methods that rank on data (hrank, taylor); "
            "spec 'l1:0.5' uses 'l1'",
        ),
        (
            ["--spec", "hrank:0.3", "--data", "nowhere"],
            "error: data='nowhere' in spec 'hrank:0.3[data=nowhere]' is not a folder; "
            "choose from: digits, synthetic",
        ),
        (
            ["--spec", "hrank:0.3[data=digits]", "--data", "synthetic"],
            "error: spec 'hrank:0.3[data=digits]' sets data=digits and --data says 'synthetic'",
        ),
        (["--spec", "hrank:0.3", "--data", "a,b"], "error: --data 'a,b' cannot go into a spec"),
        (["--spec", "l1:0.5", "--input-size", "0"], "error: input size must be a positive number"),
        (["--spec", "l1:0.5", "--model", "resnet9000"], "error: unknown model 'resnet9000'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    model = "resnet20"
    if "--model" in args:
        model = args[args.index("--model") + 1]
        args = args[: args.index("--model")]
    out = tmp_path / "out" / "model.pt"
    code, output = invoke("prune", model, *args, "--out", str(out))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), output
    assert not out.parent.exists()  # nothing written


def test_out_that_is_a_folder_is_refused_before_pruning(tmp_path: Path) -> None:
    code, output = invoke("prune", "resnet20", "--spec", "l1:0.5", "--out", str(tmp_path))
    assert code == 2
    assert output.strip() == (
        f"error: --out {str(tmp_path)!r} is a folder; give a file name, e.g. model.pt"
    )


class _FrozenMean(nn.Module):
    """Traces wrongly: float() turns the input's mean into a constant of the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x) * float(x.mean())
        return out


def test_save_pruned_refuses_a_trace_that_differs_from_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Model(name="frozen", module=_FrozenMean().eval(), input_shape=(3, 8, 8),
                  source="factory")  # fmt: skip
    variant = prune(model, "dense")
    with pytest.raises(VerificationError, match="differs from eager at batch 3"):
        save_pruned(variant, tmp_path / "frozen.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_pruned_is_public_and_round_trips(tiny_model: Model, tmp_path: Path) -> None:
    variant = benchlib.prune(tiny_model, "l2:0.5")
    archive, recipe = benchlib.save_pruned(variant, tmp_path / "deep" / "tiny")
    assert (archive, recipe) == (tmp_path / "deep" / "tiny", tmp_path / "deep" / "tiny.recipe.json")
    assert Recipe.load(recipe) == variant.recipe
    loaded = benchlib.load_model(str(archive))
    assert loaded.input_shape == (3, 16, 16)
    x = tiny_model.example_input(2, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), variant.module(x), rtol=1e-4, atol=1e-5)


def test_prune_takes_a_factory_and_an_input_size(tmp_path: Path) -> None:
    out = tmp_path / "tiny.pt"
    code, output = invoke(
        "prune", "tests.conftest:TinyNet", "--spec", "l2:0.5", "--input-size", "16",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert output.splitlines()[0] == "pruned tests.conftest:TinyNet by l2:0.5"
    assert f"  wrote {out} (TorchScript, input 3x16x16)" in output.splitlines()
    loaded = load_model(str(out))
    assert loaded.input_shape == (3, 16, 16)
    # conv1's 8 filters and conv2's 16 each lose half: conv2 and fc see half their inputs
    assert count(loaded.module, loaded.example_input(1)).params == (
        (3 * 9 * 4 + 4) + 2 * 4 + (4 * 9 * 8 + 8) + (8 * 10 + 10)
    )


def test_run_prints_failed_specs_with_their_options(tmp_path: Path) -> None:
    suite = tmp_path / "tiny.toml"
    suite.write_text(FAST_SUITE.replace('"resnet20"', '"tests.conftest:TinyNet"'))
    spec = "hrank:0.5[config=hrank-resnet50]"  # names layers TinyNet lacks: its cells fail
    code, output = invoke(
        "run", "--suite", str(suite), "--prune", f"dense,{spec}", "--no-isolation",
        "--input-size", "16", "--out", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 0, output
    failed = [line for line in output.splitlines() if line.startswith("failed")]
    assert failed and failed[0].startswith(f"failed tests.conftest:TinyNet {spec} torch-eager")
    assert "SYNTHETIC" not in output  # nothing was measured from synthetic calibration
