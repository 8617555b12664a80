"""Whole-head pruning of attention: the module that replaces an ``nn.MultiheadAttention`` once
some of its heads are removed, and the per-head weights that criteria score.

Head ``h`` of an ``nn.MultiheadAttention`` (embedding ``E``, ``H`` heads of ``d = E / H``) owns
rows ``[h*d, (h+1)*d)`` of each of the q, k and v blocks of ``in_proj_weight`` (and of
``in_proj_bias``) and columns ``[h*d, (h+1)*d)`` of ``out_proj.weight``; ``out_proj.bias``
belongs to no head. Removing a head removes those slices: the output is exactly the original's
with that head's ``out_proj`` columns zeroed. ``E``, the input and output width, is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from benchlib.errors import PruningError

__all__ = [
    "HeadPrunedAttention",
    "attention_params",
    "gather_heads",
    "head_rows",
    "rows_like",
]


class HeadPrunedAttention(nn.Module):
    """Multi-head attention with some heads removed; called like ``nn.MultiheadAttention``.

    Holds the kept heads' packed projections (``in_proj_weight`` of shape
    ``(3 * num_heads * head_dim, embed_dim)`` and ``in_proj_bias``, or None) and ``out_proj``, an
    ``nn.Linear`` from ``num_heads * head_dim`` to ``embed_dim``. ``forward`` computes what the
    original computes with ``need_weights=False`` and no mask (through
    ``F.scaled_dot_product_attention``, which ``nn.MultiheadAttention`` uses too) and returns
    ``(output, None)``; attention weights, masks and ``is_causal`` raise PruningError.
    Build one with :meth:`from_attention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if min(embed_dim, num_heads, head_dim) < 1:
            raise PruningError(
                f"attention needs positive sizes; got embed_dim={embed_dim}, "
                f"num_heads={num_heads}, head_dim={head_dim}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias: nn.Parameter | None
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_attention(cls, attention: nn.Module, kept: Sequence[int]) -> HeadPrunedAttention:
        """The heads ``kept`` (indices into ``attention``'s heads, any order, no repeats) of an
        ``nn.MultiheadAttention`` or of another HeadPrunedAttention, with their weights copied.

        Raises:
            PruningError: a module with separate q/k/v projections, ``bias_k``/``bias_v`` or
                ``add_zero_attn`` (whose heads are not independent slices), or bad indices.
        """
        in_weight, in_bias, out_proj, num_heads = _parts(attention)
        heads = [int(h) for h in kept]
        if not heads or len(set(heads)) != len(heads) or not all(0 <= h < num_heads for h in heads):
            raise PruningError(
                f"cannot keep heads {heads} of an attention module with {num_heads} heads"
            )
        head_dim = in_weight.shape[0] // (3 * num_heads)
        columns = [h * head_dim + j for h in heads for j in range(head_dim)]
        inner = num_heads * head_dim
        rows = [block * inner + c for block in range(3) for c in columns]
        pruned = cls(
            in_weight.shape[1],
            len(heads),
            head_dim,
            bias=in_bias is not None,
            out_bias=out_proj.bias is not None,
            dropout=float(getattr(attention, "dropout", 0.0)),
            batch_first=bool(getattr(attention, "batch_first", False)),
        )
        with torch.no_grad():
            row_index = torch.tensor(rows, dtype=torch.long, device=in_weight.device)
            column_index = torch.tensor(columns, dtype=torch.long, device=in_weight.device)
            pruned.in_proj_weight = _param(in_weight, in_weight.index_select(0, row_index))
            if in_bias is not None:
                pruned.in_proj_bias = _param(in_bias, in_bias.index_select(0, row_index))
            out_weight = out_proj.weight
            pruned.out_proj.weight = _param(out_weight, out_weight.index_select(1, column_index))
            if out_proj.bias is not None:
                pruned.out_proj.bias = _param(out_proj.bias, out_proj.bias)
        pruned.train(attention.training)
        return pruned

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(output, None)``, output shaped like ``query`` (``(L, E)`` unbatched, else
        ``(N, L, E)`` with ``batch_first``, ``(L, N, E)`` without)."""
        if need_weights:
            raise PruningError(
                "a head-pruned attention module returns no attention weights: call it with "
                "need_weights=False"
            )
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise PruningError(
                "a head-pruned attention module takes no key_padding_mask, attn_mask or "
                "is_causal (the pruner only cuts heads of unmasked self-attention)"
            )
        same = key is query and value is query  # self-attention: one packed in-projection
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        elif not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if same:
            q, k, v = self._packed(query)
        else:
            q, k, v = self._separate(query, key, value)
        shape = [self.num_heads, self.head_dim]
        q = torch.unflatten(q, -1, shape).transpose(1, 2)  # (N, heads, L, head_dim)
        k = torch.unflatten(k, -1, shape).transpose(1, 2)
        v = torch.unflatten(v, -1, shape).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = self.out_proj(heads.transpose(1, 2).flatten(2))  # (N, L, E)
        if not batched:
            return out.squeeze(0), None
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _packed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        return qkv[0], qkv[1], qkv[2]

    def _separate(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias
        if b is None:
            return (
                torch.nn.functional.linear(query, w[0]),
                torch.nn.functional.linear(key, w[1]),
                torch.nn.functional.linear(value, w[2]),
            )
        bs = b.chunk(3)
        return (
            torch.nn.functional.linear(query, w[0], bs[0]),
            torch.nn.functional.linear(key, w[1], bs[1]),
            torch.nn.functional.linear(value, w[2], bs[2]),
        )


def _param(old: Tensor, values: Tensor) -> nn.Parameter:
    return nn.Parameter(values.detach().clone(), requires_grad=old.requires_grad)


def _parts(attention: nn.Module) -> tuple[Tensor, Tensor | None, nn.Linear, int]:
    """(in_proj_weight, in_proj_bias, out_proj, num_heads) of an attention module whose heads
    are independent slices; PruningError for any other module."""
    if isinstance(attention, nn.MultiheadAttention):
        if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
            raise PruningError("attention with separate q/k/v projection sizes (kdim/vdim)")
        if attention.bias_k is not None or attention.bias_v is not None:
            raise PruningError("attention with bias_k/bias_v: heads are not independent slices")
        if attention.add_zero_attn:
            raise PruningError("attention with add_zero_attn: heads are not independent slices")
        return (attention.in_proj_weight, attention.in_proj_bias, attention.out_proj,
                attention.num_heads)  # fmt: skip
    if isinstance(attention, HeadPrunedAttention):
        return (attention.in_proj_weight, attention.in_proj_bias, attention.out_proj,
                attention.num_heads)  # fmt: skip
    raise PruningError(f"{type(attention).__name__} has no attention heads to prune")


def gather_heads(
    in_weight: Tensor, in_bias: Tensor | None, out_weight: Tensor, num_heads: int
) -> Tensor:
    """One row per head: its q, k and v rows of ``in_weight``, its entries of ``in_bias`` (when
    given) and its columns of ``out_weight``, flattened in that order; shape ``(num_heads, -1)``.

    Works on any tensors shaped like the weights (their gradients too)."""
    rows = [torch.unflatten(in_weight, 0, (3, num_heads, -1)).transpose(0, 1).flatten(1)]
    if in_bias is not None:
        rows.append(torch.unflatten(in_bias, 0, (3, num_heads, -1)).transpose(0, 1).flatten(1))
    rows.append(torch.unflatten(out_weight, 1, (num_heads, -1)).transpose(0, 1).flatten(1))
    return torch.cat(rows, dim=1)


def head_rows(attention: nn.Module) -> Tensor:
    """The weights of each head of an ``nn.MultiheadAttention`` or HeadPrunedAttention as one
    detached row (:func:`gather_heads`): shape ``(num_heads, -1)``, what l1/l2/fpgm score.

    Raises:
        PruningError: a module whose heads are not independent slices (see from_attention).
    """
    in_weight, in_bias, out_proj, num_heads = _parts(attention)
    with torch.no_grad():
        return gather_heads(in_weight, in_bias, out_proj.weight, num_heads).detach()


def attention_params(attention: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`head_rows` gathers, in its order: the in-projection weight, its
    bias (if any), the out-projection weight. What Taylor differentiates (:func:`rows_like`).

    Raises:
        PruningError: not an attention module with independent heads, or a weight that is not
            a Parameter.
    """
    in_weight, in_bias, out_proj, _ = _parts(attention)
    found = [in_weight, *([in_bias] if in_bias is not None else []), out_proj.weight]
    if not all(isinstance(p, nn.Parameter) for p in found):
        raise PruningError(f"{type(attention).__name__} holds a weight that is no Parameter")
    return [p for p in found if isinstance(p, nn.Parameter)]


def rows_like(attention: nn.Module, tensors: Sequence[Tensor]) -> Tensor:
    """:func:`gather_heads` of ``tensors`` shaped like :func:`attention_params` (gradients)."""
    if len(tensors) not in (2, 3):
        raise PruningError(
            f"expected 2 or 3 tensors, one per attention parameter; got {len(tensors)}"
        )
    in_bias = tensors[1] if len(tensors) == 3 else None
    return gather_heads(tensors[0], in_bias, tensors[-1], _parts(attention)[3])
