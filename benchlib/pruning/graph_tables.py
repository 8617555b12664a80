"""The op tables of the dependency graph: which modules and calls keep, pool, combine or
reshape channels (:mod:`benchlib.pruning.graph_ops` applies them)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer

from benchlib.pruning.attention import HeadPrunedAttention

HEADS = (nn.MultiheadAttention, HeadPrunedAttention)
"""Attention modules whose heads can be pruned whole (unmasked self-attention only)."""
ATTENTION = (
    *HEADS,
    swin_transformer.ShiftedWindowAttention,
    swin_transformer.ShiftedWindowAttentionV2,
)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LEAVES = (*CONV, nn.Linear, *BATCH_NORM, nn.LayerNorm, nn.GroupNorm, *ATTENTION)
"""Modules ``torch.fx`` keeps whole (HeadPrunedAttention too: a pruned model traces again)."""
SAME_SHAPE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Softmax, nn.LogSoftmax,
    torchvision.ops.StochasticDepth,
)  # fmt: skip
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
ELEMENTWISE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    "add", "sub", "mul", "div", "add_", "mul_", "maximum", "minimum",
}  # fmt: skip
SAME_SHAPE_CALLS: set[Any] = {
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.neg, torch.abs, torch.clamp,
    torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid,
    torch.nn.functional.sigmoid, torch.nn.functional.dropout, torch.nn.functional.softmax,
    torch.nn.functional.log_softmax, torchvision.ops.stochastic_depth, torch.softmax,
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "to", "type_as",
    "softmax", "clamp", "neg", "abs", "exp", "detach",
}  # fmt: skip
POOL_CALLS: set[Any] = {
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.max_pool2d,
    torch.nn.functional.interpolate,
}  # fmt: skip
REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
PERMUTES = {torch.permute, torch.transpose, torch.swapaxes, "permute", "transpose"}
RESHAPES = {torch.reshape, torch.flatten, "view", "reshape", "flatten"}
