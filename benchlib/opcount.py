"""MACs counted op by op at the aten level, for models without countable modules.

TorchScript archives do not take forward hooks, and ``torch.export`` graphs call aten ops
directly with no ``nn.Conv2d`` left to hook: both are counted here instead, with a
``TorchDispatchMode`` that sees every aten op the interpreter runs. The MAC formulas are
torch's own (``torch.utils.flop_counter``'s registry: FLOPs / 2). An op is attributed to the
parameter it multiplies (matched by storage), so a layer is named after its weight
(``layer1.0.conv1.weight`` -> ``layer1.0.conv1``) and its nonzero MACs follow that weight's
density; ops on activations only go to a layer named after the op.

Limits (torch's registry): no formula for ``aten.mv``, and the fused CPU kernel of eval-mode
``nn.MultiheadAttention`` counts 0 inside a TorchScript archive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class _OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Accumulates (dense, nonzero) MACs per layer name, in order of first execution."""

    def __init__(self, model: nn.Module, nonzero: Callable[[torch.Tensor], int]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.weights = {
            p.data_ptr(): (name.removesuffix(".weight"), p)
            for name, p in model.named_parameters()
            if p.dim() >= 2
        }
        self.nonzero = nonzero
        self.macs: dict[str, list[int]] = {}
        self.kinds: dict[str, str] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            return out
        macs = int(formula(*args, **kwargs, out_val=out)) // 2
        owner = next(
            (
                self.weights[a.data_ptr()]
                for a in args
                if isinstance(a, torch.Tensor) and a.data_ptr() in self.weights
            ),
            None,
        )
        op = func._overloadpacket.__name__
        if owner is None:
            name, nonzero = op, macs
        else:
            name, weight = owner
            nonzero = round(macs * self.nonzero(weight) / weight.numel())
        totals = self.macs.setdefault(name, [0, 0])
        totals[0] += macs
        totals[1] += nonzero
        self.kinds.setdefault(name, op.lstrip("_") if owner is not None else "matmul")
        return out


def count_ops(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    nonzero: Callable[[torch.Tensor], int],
) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Run ``model(*inputs)`` once; per layer (dense MACs, nonzero MACs) and the op's kind.

    ``nonzero`` counts a weight's nonzero elements. The caller sets eval mode and no_grad.
    """
    counter = _OpCounter(model, nonzero)
    with counter:
        model(*inputs)
    macs = {name: (dense, nz) for name, (dense, nz) in counter.macs.items()}
    return macs, counter.kinds
