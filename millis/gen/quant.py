"""Int8 weight-only quantization for CPU decode: per-output-channel symmetric scales.

Decode at small batch reads every weight once per token, so it is bound by memory bandwidth; int8
weights read a quarter of fp32's bytes. Activations stay in the model's dtype, and the matmul is
torch's `_weight_int8pack_mm` (it dequantizes inside the kernel). The embedding stays as it is;
a tied head gets its own int8 copy.
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()                                    # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0                # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # torch 2.13's bf16 CPU kernel gives wrong sums (or crashes) when `in` is not a multiple of 8:
        # pad the weight with zero columns and the input with zeros to match
        self.pad = -q.shape[1] % 8 if lin.weight.dtype == torch.bfloat16 else 0
        self.register_buffer("weight", torch.nn.functional.pad(q, (0, self.pad)).contiguous())
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach())
        self.out_features = lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.pad:
            x2 = torch.nn.functional.pad(x2, (0, self.pad))
        y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in place (the head included)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
