"""Linear layer whose weight format can change after loading: dense or weight-only int8.

Decode on CPU is bound by streaming weights from memory, so storing them as int8 with
a per-output-channel scale (PyTorch's own `_weight_int8pack_mm` kernel) reads half the
bytes of bf16. Activations and outputs keep the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("int8_weight", None, persistent=False)
        self.register_buffer("int8_scales", None, persistent=False)
        self.weight_t: torch.Tensor | None = None  # [in, out] storage, see transpose_storage

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        self.weight.copy_(w.to(self.weight.dtype))

    @torch.no_grad()
    def set_bias(self, b: torch.Tensor) -> None:
        assert self.bias is not None  # internal: only called when the config has bias
        self.bias.copy_(b.to(self.bias.dtype))

    @torch.no_grad()
    def quantize_int8(self) -> None:
        """Symmetric per-row int8; drops the dense weight to free its memory."""
        self.weight_t = None
        w = self.weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.int8_weight = q.contiguous()
        self.int8_scales = scales.to(self.weight.dtype)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=w.device),
                                   requires_grad=False)

    @torch.no_grad()
    def transpose_storage(self) -> None:
        """Keep the weight as [in, out] and compute x @ W^T from it: for the skinny
        decode matmuls (a few rows) BLAS streams this layout measurably faster on CPU
        (docs/benchmarks.md) and no extra copy is kept."""
        if self.int8_weight is None and self.weight_t is None:
            self.weight_t = self.weight.t().contiguous()
            self.weight = nn.Parameter(self.weight_t.t(), requires_grad=False)  # a view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            y = torch.matmul(x, self.weight_t)
            return y if self.bias is None else y + self.bias
        if self.int8_weight is not None:
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.int8_weight,
                                                   self.int8_scales)
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
