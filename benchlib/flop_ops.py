"""MAC formulas of functional matmul-type calls, as a table for ``benchlib.flops``.

Each rule takes a call's (args, kwargs, output) and returns its MACs and the operands that may
be a parameter (so the caller can name the layer after the weight and use its density).
Covered: matmul, mm, bmm, mv, dot, vdot, inner, linear, addmm, baddbmm, addmv,
scaled_dot_product_attention and einsum (string form, contracted left to right as torch does
without opt_einsum), from ``torch``, ``torch.Tensor`` and ``torch.nn.functional``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["FUNCTIONAL"]

# Functional ops: (args, kwargs, output) -> (MACs, the operands that may be a parameter).
_Found = tuple[int, tuple[Any, ...]]
_OpRule = Callable[[tuple[Any, ...], dict[str, Any], Any], _Found]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, *names: str) -> Any:
    return args[index] if len(args) > index else next(kwargs[n] for n in names if n in kwargs)


def _contract(first: int, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> _Found:
    # Each output element sums over the last dimension of the first matrix operand.
    a = _arg(args, kwargs, first, *(("input",) if first == 0 else ("mat1", "batch1", "mat")))
    return (out.numel() * a.shape[-1] if a.dim() else 0), (*args, *kwargs.values())


def _sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> _Found:
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    return (q.numel() // q.shape[-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]), ()


def _einsum(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> _Found:
    """Contracts left to right; an index in one operand only is summed away first (no MACs)."""
    if not args or not isinstance(args[0], str):
        return 0, ()  # the sublist format is not counted
    ops = tuple(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
    lhs, arrow, rhs = args[0].replace(" ", "").partition("->")
    terms = lhs.split(",")  # as many as operands: torch has just run the call
    dims = [(t, op.dim() - len(t.replace("...", ""))) for t, op in zip(terms, ops, strict=True)]
    dots = "".join(chr(0x100 + i) for i in range(max(n for _, n in dims)))  # "..." dims
    terms = [t.replace("...", dots[len(dots) - n :] if n else "") for t, n in dims]
    sizes: dict[str, int] = {}
    for term, op in zip(terms, ops, strict=True):
        sizes.update({c: max(sizes.get(c, 1), n) for c, n in zip(term, op.shape, strict=True)})
    once = {c for c in sizes if sum(t.count(c) for t in terms) == 1}
    result = set(rhs.replace("...", dots)) if arrow else once | set(dots)
    macs, current = 0, set(terms[0])
    for i, term in enumerate(terms[1:], start=1):
        later = result.union(*terms[i + 1 :])
        joined = {c for c in current | set(term) if c in later or (c in current and c in term)}
        macs += math.prod(sizes[c] for c in joined)
        current = joined & later
    return macs, ops


FUNCTIONAL: Mapping[Callable[..., Any], _OpRule] = MappingProxyType(
    {
        getattr(space, name): rule
        for names, rule in (
            ("matmul mm bmm mv dot vdot inner linear", partial(_contract, 0)),
            ("addmm baddbmm addmv", partial(_contract, 1)),
            ("scaled_dot_product_attention", _sdpa),
            ("einsum", _einsum),
        )
        for name in names.split()
        for space in (torch, torch.Tensor, torch.nn.functional)
        if hasattr(space, name)
    }
)
