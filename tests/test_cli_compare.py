"""``bench compare`` from the command line: output, exit codes, --json, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from benchlib.cli_compare import compare

DATA = Path(__file__).parent / "data" / "compare"
A, B = str(DATA / "a"), str(DATA / "b")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner(env={"COLUMNS": "120"}).invoke(compare, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_prints_the_verdicts_and_exits_0() -> None:
    code, out, err = invoke(A, B)
    assert code == 0, out + err
    assert "magnitude:0.5" in out and "slower" in out and "faster" in out
    assert "warning CPU model differs: A 'AMD EPYC'" in out
    assert err == ""


def test_fail_on_regression_exits_1_only_on_a_regression() -> None:
    code, out, _ = invoke(A, B, "--fail-on-regression")
    assert code == 1, out
    code, out, _ = invoke(A, A, "--fail-on-regression")
    assert code == 0, out
    # a 25% minimum effect hides the 20% slowdown; the cell that fails only in B still counts
    code, out, _ = invoke(A, B, "--fail-on-regression", "--min-effect", "0.25")
    assert code == 1 and "1 regressed" in out


def test_json_is_written(tmp_path: Path) -> None:
    path = tmp_path / "cmp.json"
    code, out, _ = invoke(A, B, "--json", str(path), "--alpha", "0.05")
    assert code == 0, out
    data = json.loads(path.read_text())
    assert data["alpha"] == 0.05 and data["regression"] is True and data["schema_version"] == 1
    assert data["correction"] == "holm" and data["test"] == "mann-whitney-u"
    verdicts = {c["key"]["spec"]: c["verdict"] for c in data["cells"]}
    assert verdicts["magnitude:0.5"] == "slower" and verdicts["fpgm:0.5"] == "added"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, _, err = invoke(A, str(tmp_path))
    assert code == 2
    assert err == f"error: {str(tmp_path)!r} is not a run folder: missing run.json, results.jsonl\n"
    code, _, err = invoke(A, str(tmp_path / "none"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = invoke(A, B, "--alpha", "2")
    assert code == 2 and err == "error: alpha must be in (0, 1), e.g. 0.01; got 2.0\n"
