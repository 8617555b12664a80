"""MACs, FLOPs and parameters per layer, dense and nonzero (DESIGN section 5).

A MAC is one multiply-accumulate; FLOPs = 2 x MACs. Only conv, linear and matmul work counts
(not bias adds, norms, activations, pooling), the papers' convention: torchvision's "GFLOPS"
are these MACs. Counts are for the inputs given: pass batch 1 for per-image numbers.

Modules with a rule (a pure function in a table, looked up along the MRO) are counted whole by
forward hooks. Matmuls outside them (Swin, MaxViT: ``F.linear``/``matmul``/``einsum`` on
parameters) are caught by a ``TorchFunctionMode``, which sees each call once, as written, with
the caller's ``Parameter`` (owner and density by identity); a ``TorchDispatchMode`` sees
``t()`` + ``addmm`` on a view and einsum in pieces. C++ internals (eval MHA's fused kernel) are
hidden from it: that is what rules are for (nn.MultiheadAttention has one, and so has the
pruner's HeadPrunedAttention: the same count for its kept heads). Nonzero MACs (ShrinkBench) =
MACs x density of the weight used, from the parameters (masks baked in); on meta tensors they
equal dense MACs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from benchlib.errors import ConfigError
from benchlib.flop_ops import FUNCTIONAL
from benchlib.opcount import count_ops

if TYPE_CHECKING:  # benchlib.pruning imports this module: the class is looked up late
    from benchlib.pruning.attention import HeadPrunedAttention

SCHEMA_VERSION = 1

# (module, forward inputs bound by position, forward output) -> MACs of that call: an int is
# scaled by the density of the module's weights for the nonzero count; a (dense, nonzero) pair
# is taken as is (MHA: its QK^T and AV products use no weight).
FlopRule = Callable[[nn.Module, tuple[Any, ...], Any], int | tuple[int, int]]


@dataclass(frozen=True, kw_only=True)
class LayerCount:
    """One counted layer, MACs summed over its calls; ``params`` are its own (weight + bias; for
    a whole-counted module its subtree's); density is over its parameters named ``*weight``."""

    name: str  # qualified module name, e.g. "layer1.0.conv1"
    kind: str  # module class name, or "matmul" for functional ops on no parameter
    macs: int
    nonzero_macs: int
    params: int
    nonzero_params: int
    weight_numel: int = 0
    nonzero_weight: int = 0

    def __post_init__(self) -> None:
        pairs = ("macs", "nonzero_macs"), ("params", "nonzero_params")
        for total, part in (*pairs, ("weight_numel", "nonzero_weight")):
            if not 0 <= getattr(self, part) <= getattr(self, total):
                raise ValueError(f"layer {self.name!r}: need 0 <= {part} <= {total}")

    @property
    def density(self) -> float:
        """Nonzero share of the layer's weights, in [0, 1]; 1.0 for a layer without weight."""
        return self.nonzero_weight / self.weight_numel if self.weight_numel else 1.0


@dataclass(frozen=True, kw_only=True)
class FlopReport:
    """Per-layer counts in execution order, and every parameter of the model counted once."""

    layers: tuple[LayerCount, ...]
    params: int
    nonzero_params: int

    def __post_init__(self) -> None:
        if not 0 <= self.nonzero_params <= self.params:
            raise ValueError("need 0 <= nonzero_params <= params")

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates of the forward pass."""
        return sum(layer.macs for layer in self.layers)

    @property
    def nonzero_macs(self) -> int:
        """Multiply-accumulates left after pruning (ShrinkBench convention)."""
        return sum(layer.nonzero_macs for layer in self.layers)

    @property
    def flops(self) -> int:
        """Dense floating-point operations, 2 x :attr:`macs`."""
        return 2 * self.macs

    @property
    def nonzero_flops(self) -> int:
        """2 x :attr:`nonzero_macs`."""
        return 2 * self.nonzero_macs

    def layer(self, name: str) -> LayerCount:
        """The layer with this qualified name; ``KeyError`` when none was counted."""
        return {layer.name: layer for layer in self.layers}[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal report."""
        data = asdict(self)
        return {"schema_version": SCHEMA_VERSION, **data, "layers": list(data["layers"])}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlopReport:
        """Inverse of :meth:`to_dict`; raises ``ConfigError`` for anything else."""
        try:
            if data["schema_version"] != SCHEMA_VERSION:
                raise ValueError(f"schema_version {data['schema_version']!r} is not 1")
            layers = tuple(LayerCount(**layer) for layer in data["layers"])
            return cls(layers=layers, params=data["params"], nonzero_params=data["nonzero_params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a FlopReport: {exc!r}") from exc


def _nonzero(tensor: torch.Tensor) -> int:
    """Nonzero elements; all of them on the meta device, which holds no values."""
    return tensor.numel() if tensor.is_meta else int(torch.count_nonzero(tensor).item())


def _scaled(macs: int, nonzero: int, numel: int) -> int:
    """``round(macs * nonzero / numel)`` (half to even, like ``round``), exact at any size."""
    return round(Fraction(macs * nonzero, numel)) if numel else macs


def _counts(module: nn.Module, *, whole: bool, suffix: str = "") -> tuple[int, int]:
    """(elements, nonzero elements) of the module's parameters named ``*suffix``, each once."""
    found = [p for n, p in module.named_parameters(recurse=whole) if n.endswith(suffix)]
    return sum(p.numel() for p in found), sum(_nonzero(p) for p in found)


def _conv(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    # Transposed: each input element is scattered to out_channels/groups x kernel outputs.
    conv = cast(nn.Conv2d, module)
    per = (conv.out_channels if conv.transposed else conv.in_channels) // conv.groups
    elements = (inputs[0] if conv.transposed else output).numel()
    return int(elements) * per * math.prod(conv.kernel_size)


def _linear(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    return int(output.numel()) * cast(nn.Linear, module).in_features


def _mha(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[int, int]:
    """In-projections, QK^T, AV and out-projection; the attention products use no weight."""
    mha = cast(nn.MultiheadAttention, module)
    embed = mha.embed_dim
    if mha.in_proj_weight is not None:
        weights = [mha.in_proj_weight[i * embed : (i + 1) * embed] for i in range(3)]
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    extra = (mha.bias_k is not None) + int(mha.add_zero_attn)
    return _attention(inputs, mha.batch_first, weights, mha.out_proj.weight, embed, extra)


def _head_pruned_mha(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> tuple[int, int]:
    """:func:`_mha` for the kept heads of a HeadPrunedAttention: ``num_heads * head_dim`` wide."""
    attention = cast("HeadPrunedAttention", module)
    inner = attention.num_heads * attention.head_dim
    weights = [attention.in_proj_weight[i * inner : (i + 1) * inner] for i in range(3)]
    weight = attention.out_proj.weight
    return _attention(inputs, attention.batch_first, weights, weight, inner, 0)


def _attention(
    inputs: tuple[Any, ...],
    batch_first: bool,
    weights: list[torch.Tensor],
    out_weight: torch.Tensor,
    inner: int,
    extra_keys: int,
) -> tuple[int, int]:
    """(dense, nonzero) MACs of attention: q/k/v ``weights`` on their tokens, QK^T and AV over
    ``inner`` channels (no weight: dense in both), and ``out_weight`` on the query tokens."""
    query, key, value = inputs[:3]
    seq_dim = 1 if batch_first and key.dim() == 3 else 0
    keys = key.shape[seq_dim] + extra_keys
    tokens = [t.numel() // t.shape[-1] for t in (query, key, value)]
    parts = [*zip(tokens, weights, strict=True), (tokens[0], out_weight)]
    attention = 2 * tokens[0] * keys * inner
    dense = sum(n * w.numel() for n, w in parts) + attention
    return dense, sum(n * _nonzero(w) for n, w in parts) + attention


DEFAULT_RULES: Mapping[type[nn.Module], FlopRule] = MappingProxyType(
    {
        **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
        **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv),
        nn.Linear: _linear,  # NonDynamicallyQuantizableLinear too, through the MRO
        nn.MultiheadAttention: _mha,
    }
)


def _pruned_module_rules() -> dict[type[nn.Module], FlopRule]:
    """Rules for the modules the structured pruner builds (imported here, at call time:
    :mod:`benchlib.pruning` imports this module for its FLOP reports)."""
    from benchlib.pruning.attention import HeadPrunedAttention

    return {HeadPrunedAttention: _head_pruned_mha}


def rule_for(module: nn.Module, rules: Mapping[type[nn.Module], FlopRule]) -> FlopRule | None:
    """The rule of the first class in ``type(module).__mro__`` that has one, else None."""
    return next((rules[cls] for cls in type(module).__mro__ if cls in rules), None)


class _Counter(TorchFunctionMode):
    """The state of one :func:`count` call: what the module hooks and the op mode saw."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}
        self.owners = {id(p): (m, p) for m in model.modules() for p in m.parameters(False)}
        self.stack = [model]  # running modules, innermost last; the model is the fallback
        self.ruled = 0  # how many of them have a rule
        self.seen: dict[str, tuple[nn.Module, str, bool]] = {}  # name -> (module, kind, whole)
        self.macs: dict[str, tuple[int, int]] = {}  # name -> (dense, nonzero)

    def enter(self, ruled: bool, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.stack.append(module)
        self.ruled += ruled

    def exit(self, rule: FlopRule | None, module: nn.Module, *call: Any) -> None:
        args, kwargs, output = call
        self.stack.pop()
        self.ruled -= rule is not None
        if rule is None or self.ruled or output is None:  # unruled, nested, or forward raised
            return
        if kwargs:  # rules take inputs by position
            with contextlib.suppress(TypeError):
                args = inspect.signature(module.forward).bind(*args, **kwargs).args
        macs = rule(module, args, output)
        if isinstance(macs, int):
            numel, nonzero = _counts(module, whole=True, suffix="weight")
            macs = macs, _scaled(macs, nonzero, numel)
        self.add(module, type(module).__name__, *macs, whole=True)

    def add(self, module: nn.Module, kind: str, dense: int, nonzero: int, *, whole: bool) -> None:
        """Adds one call's MACs to the module's layer; a class name wins over "matmul"."""
        name = self.names.get(id(module), "")
        old = self.macs.get(name, (0, 0))
        self.macs[name] = old[0] + dense, old[1] + nonzero
        if name not in self.seen or self.seen[name][1] == "matmul":
            self.seen[name] = (module, kind, whole)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        if self.ruled or func not in FUNCTIONAL:
            return output
        dense, operands = FUNCTIONAL[func](args, kwargs or {}, output)
        owned = [self.owners[id(t)] for t in operands if id(t) in self.owners]
        if owned:  # the first parameter operand names the layer and gives the density
            module, weight = owned[0]
            nonzero = _scaled(dense, _nonzero(weight), weight.numel())
            self.add(module, type(module).__name__, dense, nonzero, whole=False)
        else:  # attributed to the innermost running module
            self.add(self.stack[-1], "matmul", dense, dense, whole=False)
        return output

    def layers(self) -> tuple[LayerCount, ...]:
        """The layers in order of first execution, with their parameters as they are now."""
        found = []
        for name, (module, kind, whole) in self.seen.items():
            params, nonzero_params = _counts(module, whole=whole)
            weights = (0, 0) if kind == "matmul" else _counts(module, whole=whole, suffix="weight")
            found.append(
                LayerCount(
                    name=name,
                    kind=kind,
                    macs=self.macs[name][0],
                    nonzero_macs=self.macs[name][1],
                    params=params,
                    nonzero_params=nonzero_params,
                    weight_numel=weights[0],
                    nonzero_weight=weights[1],
                )
            )
        return tuple(found)


def count(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    extra_rules: Mapping[type[nn.Module], FlopRule] | None = None,
) -> FlopReport:
    """Counts MACs per layer, and the model's parameters, with one pass of ``model(*inputs)``.

    TorchScript archives and ``torch.export`` graphs (no hooks, or no module left to hook) are
    counted op by op instead (:mod:`benchlib.opcount`), layers named after their weights.
    The pass runs under ``torch.no_grad()`` in eval mode; every training flag is restored and
    the hooks are removed even when the forward raises (the error propagates). MACs are for the
    batch given: pass batch 1 for per-image numbers; a module called twice counts twice, its
    parameters once. ``extra_rules`` add to and override :data:`DEFAULT_RULES` and the rule of
    the pruner's HeadPrunedAttention (the most specific class in the MRO wins); neither mapping
    is modified. Model and inputs may be on the meta device (built under
    ``with torch.device("meta"):``): nonzero counts are dense there.
    """
    rules = {**DEFAULT_RULES, **_pruned_module_rules(), **(extra_rules or {})}
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    training = [(m, m.training) for m in model.modules()]
    try:
        nn.Module.train(model, False)  # not model.eval(): torch.export graphs refuse it
        with torch.no_grad():
            if _hookable(model, rules):
                layers = _count_modules(model, args, rules)
            else:
                layers = _count_aten_ops(model, args)
    finally:
        for module, flag in training:
            module.training = flag
    params, nonzero = _counts(model, whole=True)
    return FlopReport(layers=layers, params=params, nonzero_params=nonzero)


def _hookable(model: nn.Module, rules: Mapping[type[nn.Module], FlopRule]) -> bool:
    """Whether module rules can count ``model``: not TorchScript (no hooks), and not an
    aten-level graph such as ``ExportedProgram.module()`` (an fx graph with no ruled module)."""
    if isinstance(model, torch.jit.ScriptModule):
        return False
    if isinstance(model, torch.fx.GraphModule):
        return any(rule_for(m, rules) is not None for m in model.modules())
    return True


def _count_modules(
    model: nn.Module, args: tuple[Any, ...], rules: Mapping[type[nn.Module], FlopRule]
) -> tuple[LayerCount, ...]:
    counter = _Counter(model)
    handles = []
    try:
        for module in model.modules():
            rule = rule_for(module, rules)
            enter, leave = partial(counter.enter, rule is not None), partial(counter.exit, rule)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, with_kwargs=True, always_call=True))
        with counter:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return counter.layers()


def _count_aten_ops(model: nn.Module, args: tuple[Any, ...]) -> tuple[LayerCount, ...]:
    """Layers of a TorchScript or torch.export model, counted op by op (benchlib.opcount)."""
    macs, kinds = count_ops(model, args, _nonzero)
    params = dict(model.named_parameters())
    layers = []
    for name, (dense, nonzero) in macs.items():
        weight = params.get(f"{name}.weight")
        own = [p for p in (weight, params.get(f"{name}.bias")) if p is not None]
        layers.append(
            LayerCount(
                name=name,
                kind=kinds[name],
                macs=dense,
                nonzero_macs=nonzero,
                params=sum(p.numel() for p in own),
                nonzero_params=sum(_nonzero(p) for p in own),
                weight_numel=0 if weight is None else weight.numel(),
                nonzero_weight=0 if weight is None else _nonzero(weight),
            )
        )
    return tuple(layers)
