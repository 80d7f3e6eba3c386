"""Precision names -> torch dtypes: the one table (torch is imported only when a dtype is asked for)."""
from __future__ import annotations

from typing import Any

from millis.common.errors import MillisError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
WEIGHT_ONLY_FORMATS = ("int8", "int4", "fp8")  # the GPU's weight-only matmuls (millis.gpu.weight_only)


def torch_dtype(name: str) -> Any:
    """"fp32" | "fp16" | "bf16" -> the torch dtype; anything else is a MillisError naming the choices."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise MillisError(f"unknown dtype {name!r}; supported: {', '.join(DTYPE_NAMES)}")
    return table[name]
