"""Keep-masks for weight-level pruning: pure tensor functions, nothing baked (METHODS.md).

Every function takes weights by layer name and returns boolean keep-masks of the same shapes
(True = keep), so the spec-level code (``unstructured.py``) bakes them into a model and the
lottery-ticket code keeps them as masks during training. Counts are exact and ties are broken
by a stable sort over the flat index: ``magnitude_masks`` prunes the lower index first among
equal |w| (as the structured criteria do); ``nm_masks`` and ``block_masks``, which choose what
to keep, keep the lower index.

- ``magnitude_masks``: the smallest |w|, globally (open_lth's ``sparse_global``) or per layer.
- ``nm_masks``: N:M, the N largest |w| in every group of M consecutive input weights.
- ``block_masks``: whole R x C blocks of the (Cout, Cin*kh*kw) view by L2 norm.
- ``random_masks_like``: seeded random masks at given per-layer densities (the control).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from benchlib.errors import ConfigError


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], amount: float, *, scope: str
) -> dict[str, torch.Tensor]:
    """Keep-masks that zero the smallest |w|.

    ``scope="global"`` ranks all weights together (open_lth's ``sparse_global``) and zeroes
    ``round(amount * total)``; ``scope="layer"`` zeroes ``round(amount * numel)`` per layer.
    Among equal |w| the lower flat index (layers in the given order) is zeroed first.
    """
    if scope == "layer":
        return {
            name: _smallest_out(w.detach().abs().reshape(-1), amount).view_as(w)
            for name, w in weights.items()
        }
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    keep = _smallest_out(flat, amount)
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def _smallest_out(values: torch.Tensor, amount: float) -> torch.Tensor:
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    count = round(amount * values.numel())
    if count:
        keep[torch.argsort(values, stable=True)[:count]] = False
    return keep


def nm_fits(weight: torch.Tensor, m: int) -> bool:
    """Whether N:M applies: the input dimension (``weight.shape[1]``) is a multiple of ``m``."""
    return weight.dim() >= 2 and weight.shape[1] % m == 0


def nm_masks(weights: Mapping[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """N:M keep-masks: in every group of ``m`` consecutive weights along the input dimension,
    the ``n`` largest |w| (ties: the lower input index is kept).

    The convention is NVIDIA ASP's (``apex.contrib.sparsity``), the layout sparse tensor cores
    read: a conv weight (Cout, Cin, kh, kw) is permuted to (Cout, kh, kw, Cin), so each group
    is M consecutive input channels at one (output channel, kernel position); a linear weight
    (Cout, Cin) groups along each row. A layer whose input dimension (Cin per conv group) is
    not a multiple of ``m`` gets an all-True mask (see ``nm_fits``). Raises ConfigError
    unless ``0 < n < m``.
    """
    if not 0 < n < m:
        raise ConfigError(f"N:M needs integers 0 < N < M; got N={n}, M={m}")
    masks = {}
    for name, weight in weights.items():
        if not nm_fits(weight, m):
            masks[name] = torch.ones_like(weight, dtype=torch.bool)
            continue
        inner = weight.detach().abs().movedim(1, -1)
        groups = inner.reshape(-1, m)
        order = torch.argsort(groups, dim=1, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], True)
        masks[name] = keep.reshape(inner.shape).movedim(-1, 1).contiguous()
    return masks


def nm_violation(weight: torch.Tensor, n: int, m: int) -> str | None:
    """None when ``weight`` is N:M in ``nm_masks``' layout (at most ``n`` nonzeros in every
    group of ``m`` consecutive input weights at one output channel and kernel position), else
    where it first is not: ``"row 3 group 5 has 3 nonzeros"`` (0-based; a row is one output
    channel at one kernel position, in (Cout, kh, kw) order; group 5 is inputs 20-23 for M=4),
    or why no group exists (a 1-d tensor, an input dimension that is not a multiple of ``m``).
    Sparse tensor cores (TensorRT, ``to_sparse_semi_structured``) read 2:4 this way.
    """
    if weight.dim() < 2:
        return f"a {weight.dim()}-d tensor has no input dimension"
    if not nm_fits(weight, m):
        return f"{weight.shape[1]} input columns do not split into groups of {m}"
    inner = weight.detach().movedim(1, -1)
    counts = (inner.reshape(-1, inner.shape[-1] // m, m) != 0).sum(dim=-1)
    bad = (counts > n).nonzero()
    if bad.numel() == 0:
        return None
    row, group = (int(i) for i in bad[0])
    return f"row {row} group {group} has {int(counts[row, group])} nonzeros"


def block_fits(weight: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether R x C blocks tile the (Cout, Cin*kh*kw) view of ``weight`` exactly."""
    return weight.shape[0] % rows == 0 and weight[0].numel() % cols == 0


def block_norms(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """L2 norm of each R x C block of the (Cout, Cin*kh*kw) view: shape (Cout/R, Cin*kh*kw/C).
    Blocks run R along the output channels and C along the flattened input."""
    view = weight.detach().reshape(weight.shape[0], -1)
    tiled = view.reshape(view.shape[0] // rows, rows, view.shape[1] // cols, cols)
    norms: torch.Tensor = torch.linalg.vector_norm(tiled, dim=(1, 3))
    return norms


def block_masks(
    weights: Mapping[str, torch.Tensor], rows: int, cols: int, amount: float
) -> dict[str, torch.Tensor]:
    """Block keep-masks, layer by layer: zero the ``round(amount * blocks)`` R x C blocks of
    least L2 norm (ties: the lower block, row-major over the block grid, is kept).

    A layer the blocks do not tile exactly (see ``block_fits``) gets an all-True mask: no
    padding, so every zeroed block is a whole block a block-sparse kernel can skip.
    """
    if rows < 1 or cols < 1:
        raise ConfigError(f"block size must be positive integers; got {rows}x{cols}")
    masks = {}
    for name, weight in weights.items():
        if not block_fits(weight, rows, cols):
            masks[name] = torch.ones_like(weight, dtype=torch.bool)
            continue
        norms = block_norms(weight, rows, cols)
        keep = magnitude_masks({name: norms}, amount, scope="layer")[name]
        grid = keep[:, None, :, None].expand(norms.shape[0], rows, norms.shape[1], cols)
        masks[name] = grid.reshape(weight.shape).contiguous()
    return masks


def random_masks_like(
    densities: Mapping[str, float], weights: Mapping[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Seeded random keep-masks that keep ``round(density * numel)`` weights of each layer.

    One ``torch.Generator`` seeded with ``seed`` draws a permutation per layer, in the order of
    ``weights``: the same seed, layers and order give the same masks. Raises ConfigError for a
    density outside [0, 1] or a layer without one.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, weight in weights.items():
        density = densities.get(name)
        if density is None or not 0.0 <= density <= 1.0:
            raise ConfigError(f"layer {name!r} needs a density in [0, 1]; got {density!r}")
        kept = round(density * weight.numel())
        keep = torch.zeros(weight.numel(), dtype=torch.bool)
        keep[torch.randperm(weight.numel(), generator=generator)[:kept]] = True
        masks[name] = keep.view_as(weight).to(weight.device)
    return masks


def densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The share of weights each keep-mask keeps."""
    return {name: int(mask.sum()) / mask.numel() for name, mask in masks.items()}
