"""``NativeMaxPool2d``: max pooling by the native kernels, for the CNN stems ``cpu-sparse`` runs.

Measured (torch 2.14.1, 2 threads, the AMD EPYC of ``convert.py``): ResNet-50's stem pool
(3x3, stride 2, padding 1 on 1x64x112x112 NCHW) takes 2.5 ms in ``F.max_pool2d``, more than
the pruned model's whole first stage, against 0.14 ms on a channels-last input (0.37 ms with
both conversions) and about 0.05 ms here (separable: the vertical max of each output row's
window rows, vectorized, then the horizontal max; planes split over torch's threads). Same
values as torch, NaN included (a NaN in the window wins). Inputs other than contiguous-able
fp32 NCHW on the CPU, ``ceil_mode`` and ``return_indices`` are left to ``F.max_pool2d``.

With ``relu`` set (``fuse.fuse_relu`` sets it for the ReLU before the pool, ResNet's stem) the
pool returns ``relu(max_pool2d(x))``, which equals ``max_pool2d(relu(x))`` (NaN included): the
ReLU then costs a compare per output instead of a pass over the pool's input, four times its
size for a 3x3/2 pool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchlib.sparse.build import NativeLibrary, load_library


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class NativeMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` without ``ceil_mode`` and ``return_indices``, on the native kernels
    where they are built (else ``F.max_pool2d``)."""

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation = padding, dilation
        self.relu = False

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> NativeMaxPool2d | None:
        """The native form of ``pool``; None for ``ceil_mode`` or ``return_indices``."""
        if pool.ceil_mode or pool.return_indices:
            return None
        stride = pool.kernel_size if pool.stride is None else pool.stride
        return cls(
            _pair(pool.kernel_size), _pair(stride), _pair(pool.padding), _pair(pool.dilation)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loaded = load_library()
        if (
            not isinstance(loaded, NativeLibrary)
            or x.dim() != 4
            or x.dtype != torch.float32
            or x.device.type != "cpu"
        ):
            return self._torch(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation,
        )  # fmt: skip
        out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if out_h < 1 or out_w < 1 or 2 * ph > kh or 2 * pw > kw:  # torch's own errors
            return self._torch(x)
        x = x.contiguous()
        out = x.new_empty(n, c, out_h, out_w)
        if out.numel():
            loaded.max_pool2d(
                x.data_ptr(), n * c, h, w, out.data_ptr(), out_h, out_w, kh, kw, sh, sw, ph, pw,
                dh, dw, int(self.relu), torch.get_num_threads(),
            )  # fmt: skip
        return out

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` by ``F.max_pool2d`` (then the ReLU, when set)."""
        out = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)
        return out.relu_() if self.relu else out

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}" + (", relu=True" if self.relu else "")
        )


def replace_max_pools(model: nn.Module) -> int:
    """Swap every plain ``nn.MaxPool2d`` of ``model`` (in place) for ``NativeMaxPool2d``;
    returns how many. Subclasses, ``ceil_mode`` and ``return_indices`` stay."""
    natives: dict[int, NativeMaxPool2d | None] = {}
    swaps = []
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.MaxPool2d and name:
            if id(module) not in natives:  # a shared pool stays shared
                natives[id(module)] = NativeMaxPool2d.from_module(module)
            native = natives[id(module)]
            if native is not None:
                swaps.append((name, native))
    for name, native in swaps:
        model.set_submodule(name, native)
    return sum(native is not None for native in natives.values())
