"""The CLI: exit codes and one-line messages for bad input, and a small real run."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from benchlib.cli import bench
from benchlib.results import RESULTS_FILE, latest_records

WITHOUT_GPU = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks what a machine without a CUDA GPU says"
)

FAST_SUITE = """
models = ["tests.conftest:TinyNet"]
specs = ["dense", "magnitude:0.9"]
targets = ["torch-eager", "torchscript"]
batch_sizes = [1]
input_size = 16
[timing]
warmup_runs = 1
warmup_s = 0.0
min_samples = 3
min_time_s = 0.0
"""


@pytest.fixture
def fast_suite(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text(FAST_SUITE)
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "160"}).invoke(bench, list(args))
    return result.exit_code, result.output


def test_run_prints_the_table_and_writes_the_run_folder(fast_suite: Path, tmp_path: Path) -> None:
    code, output = invoke("run", "--suite", str(fast_suite), "--out", str(tmp_path / "r"))
    assert code == 0, output
    assert "tests.conftest:TinyNet - fp32" in output
    assert "magnitude:0.9" in output and "torch-eager" in output and "torchscript" in output
    (run_dir,) = (tmp_path / "r").iterdir()
    written = {p.name for p in run_dir.iterdir()}
    assert written == {"run.json", "results.jsonl", "summary.json", "report.md"} | {
        "speedup-tests.conftest-TinyNet.png"
    }
    assert "wrote " in output and "report.md" in output


def test_profile_layers_feeds_explain_and_the_report(fast_suite: Path, tmp_path: Path) -> None:
    code, output = invoke(
        "run", "--suite", str(fast_suite), "--out", str(tmp_path / "r"), "--profile-layers"
    )
    assert code == 0, output
    (run_dir,) = (tmp_path / "r").iterdir()
    records = latest_records(run_dir / RESULTS_FILE)
    profiled = {r.key.target for r in records if r.layer_profile is not None}
    assert profiled == {"torch-eager"}  # TorchScript does not run the module as written
    report = (run_dir / "report.md").read_text()
    assert "### Why not more: per-layer profile" in report
    plot = run_dir / "layers-tests.conftest-TinyNet-magnitude-0.9-torch-eager-bs1-fp32.png"
    assert plot.stat().st_size > 1000 and f"]({plot.name})" in report
    code, output = invoke(
        "explain",
        str(run_dir),
        "--model",
        "tests.conftest:TinyNet",
        "--spec",
        "magnitude:0.9",
        "--target",
        "torch-eager",
    )
    assert code == 0, output
    # only what the MAC counts decide: which tags fire on TinyNet's microsecond layers is noise
    assert "Layers by lost time" in output and "left dense" in output
    conv2 = next(line for line in output.splitlines() if line.lstrip().startswith("conv2 "))
    assert "10.02x" in conv2  # conv2's F: 90% of its weights zeroed, MACs counted per weight


@WITHOUT_GPU
def test_gpu_selector_without_gpu_says_why_in_one_line(fast_suite: Path, tmp_path: Path) -> None:
    code, output = invoke(
        "run", "--suite", str(fast_suite), "--targets", "gpu,torch-eager", "--out", str(tmp_path)
    )
    assert code == 0, output
    skipped = [line for line in output.splitlines() if line.startswith("skipped")]
    # one line per distinct reason, every CUDA target named on one of them
    assert len(skipped) == len(set(skipped)) >= 1
    cuda_line = next(line for line in skipped if "torch-eager-cuda" in line)
    assert "CUDA" in cuda_line
    for name in ("torchscript-cuda", "tensorrt", "cuda-sparse24", "onnxruntime-cuda"):
        assert any(name in line for line in skipped), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "resnet9000"], "error: unknown model 'resnet9000'; choose from: "),
        (["--targets", "tensorrtt"], "error: unknown target 'tensorrtt'; choose from: "),
        (["--prune", "l9:0.5"], "error: unknown pruning method 'l9'; choose from: "),
        (["--prune", "magnitude:1.5"], "error: amount 1.5 in spec 'magnitude:1.5' is outside"),
        (["--prune", "magnitude:0"], "error: amount 0 in spec 'magnitude:0' is outside (0, 1)"),
        (["--batch-sizes", "0"], "error: batch size 0 must be a positive integer"),
        (["--batch-sizes", "x"], "error: batch size 'x' is not a positive integer"),
        (["--precision", "fp8"], "error: unknown precision 'fp8'; choose from: bf16, fp16, fp32"),
        (["--threads", "0"], "error: threads 0 must be a positive integer"),
        (["--suite", "nope"], "error: unknown suite 'nope'; choose from: "),
        pytest.param(
            ["--targets", "torch-eager-cuda"],
            "error: target 'torch-eager-cuda' is unavailable: ",
            marks=WITHOUT_GPU,
        ),
        (["--prune", "magnitude:0.5[prune_first=maybe]"], "error: option prune_first='maybe'"),
        (["--prune", "magnitude:0.5[typo=1]"], "error: unknown option 'typo'; choose from: "),
        (["--precision", ""], "error: suite 'fast': precisions must be a non-empty list"),
        (["--input-size", "0"], "error: input size 0 must be a positive integer"),
        (["--out", "/dev/null/x"], "error: cannot create a run folder under --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    fast_suite: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    code, output = invoke("run", "--suite", str(fast_suite), "--out", str(out), *args)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), output
    assert "Traceback" not in output
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_missing_model_file_names_the_path(fast_suite: Path, tmp_path: Path) -> None:
    code, output = invoke("run", "--suite", str(fast_suite), "--models", "missing.pt")
    assert code == 2
    assert output.strip() == "error: model file 'missing.pt' does not exist"


def test_corrupt_model_file_is_a_clear_error(fast_suite: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model at all")
    code, output = invoke(
        "run", "--suite", str(fast_suite), "--models", str(bad), "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert output.startswith("error: ") and str(bad) in output, output
    assert len(output.strip().splitlines()) == 1


def test_verbose_shows_the_traceback(fast_suite: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench,
        ["-v", "run", "--suite", str(fast_suite), "--models", "resnet9000", "--out", str(tmp_path)],
    )
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_targets_lists_every_target_with_reason() -> None:
    code, output = invoke("targets")
    assert code == 0
    for name in ("torch-eager", "torchscript", "torch-compile", "onnxruntime", "tensorrt"):
        assert name in output
    assert "torch-compile:max-autotune" in output  # the option, spelled as --targets takes it
    assert f"onnxruntime {onnxruntime.__version__}" in output
    assert "tensorrt package is not installed" in output or "TensorRT" in output


def test_resume_takes_no_other_run_options(tmp_path: Path) -> None:
    code, output = invoke("run", "--resume", str(tmp_path), "--models", "resnet20")
    assert code == 2
    assert output.strip() == f"error: --resume takes the suite from {tmp_path}; drop --models"


def test_resume_of_a_folder_that_is_no_run(tmp_path: Path) -> None:
    code, output = invoke("run", "--resume", str(tmp_path))
    assert code == 2
    assert output.startswith(f"error: cannot resume {str(tmp_path)!r}: not a run folder")
