"""Tests of benchlib.loading: zoo names, TorchScript/export archives, factories, weights."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from benchlib.errors import ConfigError, ModelLoadError
from benchlib.loading import load_model
from benchlib.models import Model, build_model

# torch.jit.trace and torch.jit.save warn that TorchScript is deprecated; the tests need them
# to write the archives that users bring. (benchlib itself only loads, and silences the load
# notice.)
JIT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(trace|trace_method|save)` is deprecated:FutureWarning"
)


def resnet20_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("resnet20").module.state_dict()


# -- files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20() -> Model:
    torch.manual_seed(0)
    return build_model("resnet20")


def assert_same_outputs(loaded: Model, reference: Model) -> None:
    x = reference.example_input(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference.module(x))


@JIT_DEPRECATED
def test_torchscript_round_trip(tmp_path: Path, resnet20: Model) -> None:
    traced = torch.jit.trace(resnet20.module, resnet20.example_input(1))  # type: ignore[no-untyped-call]
    path = tmp_path / "resnet20.ts"  # the extension is not what tells the kind
    shape = json.dumps({"input_shape": [3, 32, 32]})
    torch.jit.save(traced, str(path), _extra_files={"benchlib.json": shape})
    loaded = load_model(str(path))
    assert (loaded.name, loaded.source, loaded.input_shape) == (
        str(path),
        "torchscript",
        (3, 32, 32),
    )
    assert not loaded.module.training
    assert_same_outputs(loaded, resnet20)
    bare = tmp_path / "bare.pt"
    torch.jit.save(traced, str(bare))
    assert load_model(str(bare)).input_shape == (3, 224, 224)
    assert load_model(str(bare), input_size=32).input_shape == (3, 32, 32)


def test_export_round_trip(tmp_path: Path, resnet20: Model) -> None:
    program = torch.export.export(resnet20.module, (resnet20.example_input(2),))
    path = tmp_path / "resnet20.pt2"
    torch.export.save(program, path)
    loaded = load_model(str(path))
    assert (loaded.source, loaded.input_shape) == ("export", (3, 32, 32))
    assert not loaded.module.training
    assert_same_outputs(loaded, resnet20)
    with pytest.raises(ConfigError, match="cannot take input size 64"):
        load_model(str(path), input_size=64)
    weights = tmp_path / "weights.pt"
    torch.save(resnet20_state(3), weights)
    reloaded = load_model(str(path), weights=weights)
    torch.manual_seed(3)
    assert_same_outputs(reloaded, build_model("resnet20"))


def write_factory(folder: Path, body: str) -> None:
    (folder / "tests_helpers_module.py").write_text(
        "import torch\nfrom benchlib.cifar_nets import resnet20\n\n" + body
    )


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delitem(sys.modules, "tests_helpers_module", raising=False)
    yield tmp_path
    sys.modules.pop("tests_helpers_module", None)


def test_factory_with_shape(factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_factory(factory_dir, "def make():\n    return resnet20().train(), (3, 16, 16)\n")
    monkeypatch.syspath_prepend(str(factory_dir))
    model = load_model("tests_helpers_module:make")
    assert (model.name, model.source) == ("tests_helpers_module:make", "factory")
    assert model.input_shape == (3, 16, 16) and not model.module.training
    assert load_model("tests_helpers_module:make", input_size=8).input_shape == (3, 8, 8)


def test_factory_from_current_directory(factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_factory(factory_dir, "def make():\n    return resnet20()\n\ndef bad():\n    return 3\n")
    monkeypatch.chdir(factory_dir)
    path_before = list(sys.path)
    assert load_model("tests_helpers_module:make").input_shape == (3, 224, 224)
    assert sys.path == path_before
    with pytest.raises(ModelLoadError, match=r"returned a int, not an nn\.Module"):
        load_model("tests_helpers_module:bad")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_model("tests_helpers_module:nope")
    with pytest.raises(ConfigError, match="no module named 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:make")


def test_pickle_needs_trust(tmp_path: Path, resnet20: Model) -> None:
    path = tmp_path / "whole.pt"
    torch.save(resnet20.module, path)
    with pytest.raises(ModelLoadError, match="will not unpickle") as caught:
        load_model(str(path))
    assert "--trust" in str(caught.value) and str(path) in str(caught.value)
    loaded = load_model(str(path), trust=True, input_size=32)
    assert (loaded.source, loaded.input_shape) == ("pickle", (3, 32, 32))
    assert_same_outputs(loaded, resnet20)


def test_state_dict_given_as_model_says_so(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(resnet20_state(0), path)
    with pytest.raises(ModelLoadError, match="is a state dict, not a model"):
        load_model(str(path))


@pytest.mark.parametrize(
    "wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3}], ids=["plain", "nested"]
)
def test_weights_are_loaded(
    tmp_path: Path, wrap: Callable[[dict[str, torch.Tensor]], object]
) -> None:
    state = resnet20_state(1)
    path = tmp_path / "weights.pt"
    torch.save(wrap(state), path)
    torch.manual_seed(2)
    loaded = load_model("resnet20", weights=path).module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "resnet32.pt"
    torch.save(build_model("resnet32").module.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"unexpected layer1\.3\.conv1\.weight, ") as caught:
        load_model("resnet20", weights=path)
    assert "more" in str(caught.value)
    state = resnet20_state(0)
    state["fc.weight"] = torch.zeros(5, 64)
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"missing fc\.bias; shape fc\.weight \(5, 64\)"):
        load_model("resnet20", weights=path)
    with pytest.raises(ConfigError, match=r"weights file .* does not exist"):
        load_model("resnet20", weights=tmp_path / "absent.pt")


def test_missing_and_corrupt_files(tmp_path: Path, resnet20: Model) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(ConfigError, match=f"model file '{missing}' does not exist"):
        load_model(str(missing))
    with pytest.raises(ConfigError, match="not a file"):
        load_model(str(tmp_path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a model")
    with pytest.raises(ModelLoadError, match=f"{junk}: not a model archive"):
        load_model(str(junk))
    program = torch.export.export(resnet20.module, (resnet20.example_input(1),))
    whole = tmp_path / "whole.pt2"
    torch.export.save(program, whole)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=str(truncated)):
        load_model(str(truncated))
