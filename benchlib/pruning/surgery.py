"""Module surgery: replace the tensors of conv, linear and norm layers with their kept slices.

The modules stay the same objects of the same classes (the model keeps its ``forward``); their
parameters are replaced by smaller ones and their size attributes (``out_channels``,
``in_features``, ``num_features``, ``normalized_shape``, ``groups``) are updated to match.
The one exception is attention whose heads are cut (``"heads"`` members): the module is
replaced, on its parent, by a :class:`~benchlib.pruning.attention.HeadPrunedAttention` of the
kept heads (``nn.MultiheadAttention`` has no smaller form).
"""

from __future__ import annotations

import torch
from torch import nn

from benchlib.errors import PruningError
from benchlib.pruning.attention import HeadPrunedAttention
from benchlib.pruning.graph import DependencyGraph, Member

__all__ = ["apply_cuts"]


def apply_cuts(model: nn.Module, graph: DependencyGraph, kept: dict[str, list[int]]) -> None:
    """Cut ``model`` in place so each group of ``graph`` keeps the channels ``kept`` names.

    ``kept`` maps group keys to sorted indices into the dense channels. Raises PruningError
    for a member the surgery does not know how to cut.
    """
    with torch.no_grad():
        for member, indices, _ in graph.cuts(kept):
            _cut(model, member, indices)


def _cut(model: nn.Module, member: Member, indices: list[int]) -> None:
    if member.kind == "param":
        owner_name, _, attr = member.target.rpartition(".")
        owner = model.get_submodule(owner_name)
        _replace(owner, attr, member.dim, indices)
        return
    if member.kind == "heads":
        _replace_heads(model, member.target, indices)
        return
    module = model.get_submodule(member.target)
    if member.kind == "out":
        _replace(module, "weight", 0, indices)
        _replace(module, "bias", 0, indices)
        _set_size(module, out=len(indices))
    elif member.kind == "in":
        _replace(module, "weight", 1, indices)
        _set_size(module, inp=len(indices))
    elif member.kind == "depthwise":
        for name in ("weight", "bias"):
            _replace(module, name, 0, indices)
        _set_size(module, out=len(indices), inp=len(indices), groups=len(indices))
    elif member.kind == "norm":
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace(module, name, 0, indices)
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = len(indices)
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (len(indices),)
    else:
        raise PruningError(f"cannot cut {member.kind!r} member {member.target}")


def _replace_heads(model: nn.Module, target: str, indices: list[int]) -> None:
    """Put a HeadPrunedAttention of the heads ``indices`` in place of attention ``target``."""
    if not target:
        raise PruningError("cannot replace the model itself: prune the heads of a submodule")
    parent_name, _, attr = target.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, HeadPrunedAttention.from_attention(getattr(parent, attr), indices))


def _replace(module: nn.Module, name: str, dim: int, indices: list[int]) -> None:
    """Keep ``indices`` along ``dim`` of the parameter or buffer ``name`` (if it is set)."""
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    index = torch.tensor(indices, dtype=torch.long, device=tensor.device)
    sliced = tensor.detach().index_select(dim, index).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
    else:
        module.register_buffer(name, sliced)


def _set_size(
    module: nn.Module, *, out: int | None = None, inp: int | None = None, groups: int | None = None
) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        if groups is not None:
            module.groups = groups
        if out is not None:
            module.out_channels = out
        if inp is not None:
            module.in_channels = inp if groups is not None else inp * module.groups
    elif isinstance(module, nn.Linear):
        if out is not None:
            module.out_features = out
        if inp is not None:
            module.in_features = inp
    else:
        raise PruningError(f"cannot resize {type(module).__name__} (only conv and linear)")
