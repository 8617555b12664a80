"""Whole-head pruning of ``nn.MultiheadAttention``: the graph's head groups (and when attention
stays pinned), ``HeadPrunedAttention`` against the dense module, the criteria on heads, MAC
counts, and a small torchvision ViT pruned, exported and replayed.

The exactness check: dropping a head is the same as zeroing its columns of ``out_proj.weight``
in the dense module (its attention output then contributes nothing). Expected scores and MACs
are computed here, head by head from the dense weights, never read back from the code under
test.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchlib.archive import trace_checked
from benchlib.data import Dataset
from benchlib.errors import PruningError
from benchlib.flops import count
from benchlib.models import Model
from benchlib.pruning import Variant, prune, replay
from benchlib.pruning.attention import HeadPrunedAttention, head_rows
from benchlib.pruning.graph import Member, build_graph
from benchlib.pruning.scoring import Calibration, score_groups
from benchlib.pruning.surgery import apply_cuts

EMBED, HEADS, SEQ = 32, 4, 5
HEAD_DIM = EMBED // HEADS
JIT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(trace|trace_method|script)` is deprecated:FutureWarning"
)


class Block(nn.Module):
    """A ViT encoder block on (batch, SEQ, EMBED) tokens: pre-norm self-attention and MLP,
    both residual; ``call`` picks how the attention is called (to test what stays pinned)."""

    def __init__(self, call: str = "self", **mha: object) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(EMBED)
        self.attn = nn.MultiheadAttention(EMBED, mha.pop("num_heads", HEADS), batch_first=True,
                                          **mha)  # type: ignore[arg-type]  # fmt: skip
        self.ln_2 = nn.LayerNorm(EMBED)
        self.fc1 = nn.Linear(EMBED, 48)
        self.fc2 = nn.Linear(48, EMBED)
        self.call = call
        self.register_buffer("mask", torch.zeros(3, SEQ, dtype=torch.bool))  # batch 3 only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        if self.call == "self":
            a, _ = self.attn(y, y, y, need_weights=False)
        elif self.call == "cross":
            a, _ = self.attn(y, x, x, need_weights=False)
        elif self.call == "weights":
            a, _ = self.attn(y, y, y)  # need_weights defaults to True
        else:
            a, _ = self.attn(y, y, y, key_padding_mask=self.mask, need_weights=False)
        x = x + a
        return x + self.fc2(torch.relu(self.fc1(self.ln_2(x))))


def tokens(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, SEQ, EMBED, generator=torch.Generator().manual_seed(seed))


def block(**kwargs: object) -> Block:
    torch.manual_seed(0)
    return Block(**kwargs).eval()  # type: ignore[arg-type]


def independent_head_vectors(mha: nn.MultiheadAttention) -> torch.Tensor:
    """Each head's weights as one float64 vector, gathered here slice by slice: its out_proj
    columns, then its q, k and v rows, each followed by its bias entries (another order than
    ``head_rows``: norms and distances between heads do not depend on it)."""
    w, b = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    out = mha.out_proj.weight.detach().double()
    d, e = mha.head_dim, mha.embed_dim
    heads = []
    for h in range(mha.num_heads):
        parts = [out[:, h * d : (h + 1) * d].flatten()]
        for block_start in (0, e, 2 * e):
            rows = slice(block_start + h * d, block_start + (h + 1) * d)
            parts += [w[rows].flatten(), b[rows]]
        heads.append(torch.cat(parts))
    return torch.stack(heads)


def independent_head_l1(mha: nn.MultiheadAttention) -> torch.Tensor:
    return independent_head_vectors(mha).abs().sum(dim=1)


def attention_macs(queries: int, seq: int, heads: int) -> int:
    """Self-attention of ``heads`` heads on ``queries`` tokens (sequences of ``seq``), by hand:
    q/k/v projections, out projection, QK^T and AV."""
    inner = heads * HEAD_DIM
    return queries * (3 * inner * EMBED + inner * EMBED) + 2 * queries * seq * inner


# -- the graph ----------------------------------------------------------------------------------


def test_self_attention_heads_form_a_group_and_embedding_dims_stay_pinned() -> None:
    graph = build_graph(block(), tokens())
    groups = {g.key: g for g in graph.groups}
    assert set(groups) == {"attn", "fc1"}  # the embedding (residual stream) is pinned
    heads = groups["attn"]
    assert heads.size == HEADS and heads.producers == ("attn",)
    assert heads.members == (Member("heads", "attn"),)
    assert graph.blocked == []


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"call": "cross"}, "not self-attention"),
        ({"call": "weights"}, "need_weights=True"),
        ({"call": "mask"}, "attention mask"),
        ({"add_bias_kv": True}, "bias_k/bias_v"),
        ({"add_zero_attn": True}, "add_zero_attn"),
    ],
)
def test_attention_the_heads_rule_cannot_cut_stays_pinned_with_a_reason(
    kwargs: dict[str, object], why: str
) -> None:
    graph = build_graph(block(**kwargs), tokens())
    assert [g.key for g in graph.groups] == ["fc1"]
    assert len(graph.blocked) == 1
    assert graph.blocked[0].startswith("attention heads of attn: ") and why in graph.blocked[0]


def test_single_head_attention_has_no_group() -> None:
    graph = build_graph(block(num_heads=1), tokens())
    assert [g.key for g in graph.groups] == ["fc1"] and graph.blocked == []


# -- HeadPrunedAttention ------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [[1], [0, 3], [0, 1, 2]])
def test_cutting_heads_is_zeroing_their_out_proj_columns(removed: list[int]) -> None:
    model = block()
    x = tokens()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for h in removed:
            zeroed.attn.out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0.0
        expected = zeroed(x)
        assert (expected - model(x)).abs().max() > 1e-3  # the removed heads mattered
    kept = [h for h in range(HEADS) if h not in removed]
    graph = build_graph(model, x)
    apply_cuts(model, graph, {"attn": kept})
    assert isinstance(model.attn, HeadPrunedAttention)
    assert model.attn.num_heads == len(kept) and model.attn.head_dim == HEAD_DIM
    assert model.attn.in_proj_weight.shape == (3 * len(kept) * HEAD_DIM, EMBED)
    assert model.attn.out_proj.weight.shape == (EMBED, len(kept) * HEAD_DIM)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_pruned_attention_matches_the_dense_module_in_every_layout(
    batch_first: bool,
) -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first).eval()
    kept = [3, 1]  # any order: the heads' order does not change the sum over heads
    pruned = HeadPrunedAttention.from_attention(mha, kept).eval()
    with torch.no_grad():
        for h in (0, 2):
            mha.out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0.0
        q = torch.randn(3, SEQ, EMBED) if batch_first else torch.randn(SEQ, 3, EMBED)
        kv = torch.randn(3, 7, EMBED) if batch_first else torch.randn(7, 3, EMBED)
        for args in ((q, q, q), (q, kv, kv), (q[0], q[0], q[0])):  # self, cross, unbatched
            out, weights = pruned(*args)
            assert weights is None
            expected, _ = mha(*args, need_weights=False)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # pruning a pruned module again composes
        again = HeadPrunedAttention.from_attention(pruned, [1])
        torch.testing.assert_close(head_rows(again), head_rows(mha)[[1]])


def test_head_pruned_attention_refuses_weights_and_masks() -> None:
    pruned = HeadPrunedAttention.from_attention(nn.MultiheadAttention(EMBED, HEADS), [0, 1])
    x = tokens()
    with pytest.raises(PruningError, match="need_weights=False"):
        pruned(x, x, x, need_weights=True)
    with pytest.raises(PruningError, match="attn_mask"):
        pruned(x, x, x, attn_mask=torch.zeros(SEQ, SEQ))
    with pytest.raises(PruningError, match="cannot keep heads"):
        HeadPrunedAttention.from_attention(nn.MultiheadAttention(EMBED, HEADS), [0, 4])
    with pytest.raises(PruningError, match="kdim/vdim"):
        HeadPrunedAttention.from_attention(nn.MultiheadAttention(EMBED, HEADS, kdim=8), [0])


def test_head_rows_gather_each_heads_weights() -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(EMBED, HEADS)
    rows = head_rows(mha)
    assert rows.shape == (HEADS, 3 * HEAD_DIM * EMBED + 3 * HEAD_DIM + EMBED * HEAD_DIM)
    torch.testing.assert_close(rows.double().abs().sum(1), independent_head_l1(mha))
    h = 2  # head 2's q rows come first, its (EMBED x HEAD_DIM) block of out_proj last
    q_rows = mha.in_proj_weight[h * HEAD_DIM : (h + 1) * HEAD_DIM].flatten()
    assert torch.equal(rows[h, : q_rows.numel()], q_rows.detach())
    out_cols = mha.out_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].flatten()
    assert torch.equal(rows[h, -out_cols.numel() :], out_cols.detach())


def test_macs_of_pruned_attention_are_its_kept_heads() -> None:
    model = block()
    x = tokens(batch=1)
    n = SEQ  # tokens of one image
    dense = count(model, x)
    assert dense.layer("attn").macs == attention_macs(n, SEQ, HEADS)
    apply_cuts(model, build_graph(model, x), {"attn": [0, 2, 3]})
    pruned = count(model, x)
    assert pruned.layer("attn").kind == "HeadPrunedAttention"
    assert pruned.layer("attn").macs == attention_macs(n, SEQ, 3)
    assert pruned.macs == dense.macs - attention_macs(n, SEQ, 1)
    assert pruned.params == dense.params - 4 * HEAD_DIM * EMBED - 3 * HEAD_DIM


# -- a small torchvision ViT -------------------------------------------------------------------


def small_vit() -> Model:
    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=HEADS, hidden_dim=EMBED,
        mlp_dim=64, num_classes=10,
    ).eval()  # fmt: skip
    nn.init.normal_(module.heads.head.weight)  # torchvision zeroes it: every output would be 0
    return Model(name="vit-small", module=module, input_shape=(3, 32, 32), source="factory")


ATTENTION = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]


@pytest.fixture(scope="module")
def vit() -> tuple[Model, Variant]:
    model = small_vit()
    return model, prune(model, "l1:0.5")


def test_l1_on_a_vit_keeps_the_two_strongest_heads_of_each_layer(
    vit: tuple[Model, Variant],
) -> None:
    model, variant = vit
    for name in ATTENTION:
        scores = independent_head_l1(model.module.get_submodule(name))
        strongest = sorted(torch.argsort(scores, descending=True)[:2].tolist())
        assert variant.recipe.details["kept"][name] == strongest
        attention = variant.module.get_submodule(name)
        assert isinstance(attention, HeadPrunedAttention) and attention.num_heads == 2
    graph = build_graph(model.module, model.example_input(2))
    scores = score_groups(model.module, graph, graph.groups, "l1")
    for name in ATTENTION:
        expected = independent_head_l1(model.module.get_submodule(name))
        torch.testing.assert_close(scores[name], expected)


def test_pruned_vit_runs_smaller_and_traces_again(vit: tuple[Model, Variant]) -> None:
    model, variant = vit
    x = model.example_input(2, seed=3)
    with torch.no_grad():
        assert variant.module(x).shape == model.module(x).shape == (2, 10)
        assert variant.module(x).abs().min() > 1e-3  # outputs worth comparing
    dense = count(model.module, model.example_input(1))
    assert variant.flops.macs < dense.macs and variant.flops.params < dense.params
    n = (32 // 8) ** 2 + 1  # 16 patches and the class token
    for name in ATTENTION:  # the heads really went: 2 of 4 in every attention layer
        assert variant.flops.layer(name).macs == attention_macs(n, n, 2)
        assert dense.layer(name).macs == attention_macs(n, n, 4)
    # torch's own aten-level count; it has no rule for the CPU flash kernel of SDPA, so run
    # the math kernel (plain matmuls) for it
    math = sdpa_kernel(SDPBackend.MATH)
    with FlopCounterMode(display=False) as torch_counter, torch.no_grad(), math:
        variant.module(model.example_input(1))
    assert variant.flops.macs == torch_counter.get_total_flops() // 2
    regraph = build_graph(variant.module, x)  # a pruned model is a model like any other
    sizes = {g.key: g.size for g in regraph.groups}
    assert all(sizes[name] == 2 for name in ATTENTION)


def test_recipe_replays_to_the_identical_vit(vit: tuple[Model, Variant]) -> None:
    model, variant = vit
    again = replay(model, variant.recipe)
    theirs, ours = again.module.state_dict(), variant.module.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert again.flops == variant.flops


@JIT_DEPRECATED
def test_pruned_vit_traces_and_scripts_with_torch_jit(vit: tuple[Model, Variant]) -> None:
    model, variant = vit
    x = model.example_input(2, seed=4)
    # save_pruned's path: checks the trace against eager at batch 2 and at batch 3 (so no
    # batch size is frozen in); torchvision's image-size assert warns while tracing
    traced = trace_checked(variant.module, x)
    with torch.no_grad():
        eager = variant.module(x)
        torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-5)
        scripted = torch.jit.script(variant.module)
        torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)
    assert any(p.shape == (3 * 2 * HEAD_DIM, EMBED) for p in traced.parameters())


def test_pruned_vit_exports_to_onnx_runtime(vit: tuple[Model, Variant], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, variant = vit
    x = model.example_input(2, seed=5)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(variant.module, (x,), str(path), dynamo=True, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        eager = variant.module(x)
    torch.testing.assert_close(torch.from_numpy(out), eager, rtol=1e-4, atol=1e-4)


# -- the other criteria on heads ---------------------------------------------------------------


def calibration(model: Model) -> Calibration:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, *model.input_shape, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    data = Dataset(images=images, labels=labels, num_classes=10, source="test", synthetic=True)
    return Calibration(data, batch_size=2, num_batches=2)


def test_taylor_scores_heads_by_weight_times_gradient() -> None:
    model = small_vit()
    graph = build_graph(model.module, model.example_input(2))
    data = calibration(model)
    scores = score_groups(model.module, graph, graph.groups, "taylor", calibration=data)
    module = copy.deepcopy(model.module)
    for images, labels in data:
        loss = nn.functional.cross_entropy(module(images), labels)
        loss.backward()
    for name in ATTENTION:
        mha = module.get_submodule(name)
        d, e = mha.head_dim, mha.embed_dim
        expected = []
        for h in range(HEADS):
            total = torch.zeros((), dtype=torch.float64)
            cols = slice(h * d, (h + 1) * d)
            pairs = [(mha.out_proj.weight[:, cols], mha.out_proj.weight.grad[:, cols])]
            for start in (0, e, 2 * e):
                rows = slice(start + h * d, start + (h + 1) * d)
                pairs.append((mha.in_proj_weight[rows], mha.in_proj_weight.grad[rows]))
                pairs.append((mha.in_proj_bias[rows], mha.in_proj_bias.grad[rows]))
            for w, g in pairs:
                total = total + (w.detach().double() * g.double()).sum()
            expected.append(total.abs())
        assert (scores[name] > 0).all()  # gradients reach the heads
        torch.testing.assert_close(scores[name], torch.stack(expected), rtol=1e-4, atol=1e-9)


def test_l2_and_fpgm_score_heads_on_their_weights() -> None:
    model = small_vit()
    graph = build_graph(model.module, model.example_input(2))
    l2 = score_groups(model.module, graph, graph.groups, "l2")
    fpgm = score_groups(model.module, graph, graph.groups, "fpgm")
    for name in ATTENTION:
        heads = independent_head_vectors(model.module.get_submodule(name))
        torch.testing.assert_close(l2[name], heads.norm(dim=1))
        distances = [[(a - b).norm() for b in heads] for a in heads]
        expected = torch.tensor([sum(row).item() for row in distances], dtype=torch.float64)
        torch.testing.assert_close(fpgm[name], expected)


def test_random_cuts_heads_too() -> None:
    variant = prune(small_vit(), "random:0.5")
    for name in ATTENTION:
        assert len(variant.recipe.details["kept"][name]) == 2
        assert variant.module.get_submodule(name).num_heads == 2


def test_hrank_and_slim_leave_heads_unscored() -> None:
    model = small_vit()
    graph = build_graph(model.module, model.example_input(2))
    assert not score_groups(model.module, graph, graph.groups, "slim")
    hrank = score_groups(model.module, graph, graph.groups, "hrank", calibration=calibration(model))
    assert not set(hrank) & set(ATTENTION)
