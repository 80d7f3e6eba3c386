"""The Runtime Protocol, the runtime kinds, and what every runtime shares: default threads, batch checks
(the factory that opens a built variant directory is millis.runtimes.registry).

A runtime takes one flat batch, a dict of int64 arrays of shape (B, T) named like the graph inputs,
and returns {output_name: float32 array}. Padding and batching are the caller's business.

Two optional attributes a runtime may declare (read with `shares_scales_across_rows` / getattr):
- `shares_scales_across_rows: bool`: one row's output depends on the other rows of its call (dynamic int8 with
  one activation scale per tensor: ONNX Runtime's DynamicQuantizeLinear). A server then never runs rows of
  different requests in one call, so a request's result does not depend on its batch-mates. Absent: False.
- `vocab_size: int`: the rows of its token embedding table, where the runtime knows them (an id past it is a
  device fault on CUDA): a bound on the ids it may be given.
And one optional method (read with `gives_token_states`): `token_states(batch) -> (B, T, H) float32`, every token's
last hidden state before pooling and head (HF's last_hidden_state; zeros where the mask drops a token): TEI's
/embed_all. The native and torch runtimes have it; ONNX Runtime and OpenVINO where the embedder's graph has the
second output STATES_NAME (millis exports it since 2026-12-07: an older artifact's graph returns its pooled output
alone); the CUDA runtime eagerly (its graphs capture the pooled forward alone).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from millis.common import hardware
from millis.common.errors import MillisError

KINDS = ("torch", "onnxruntime", "openvino", "native", "cuda")


@runtime_checkable
class Runtime(Protocol):
    name: str                      # the variant name, e.g. "ort-int8-dynamic"
    input_names: tuple[str, ...]   # input_ids, attention_mask[, token_type_ids]
    output_name: str               # logits | embedding

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(B, T) int64 inputs -> {output_name: (B, N) float32}."""
        ...


def shares_scales_across_rows(runtime: Runtime) -> bool:
    """The runtime's rows change one another's outputs (see the module's docstring)."""
    return bool(getattr(runtime, "shares_scales_across_rows", False))


def gives_token_states(runtime: Runtime) -> bool:
    """The runtime has `token_states` (see the module's docstring)."""
    return callable(getattr(runtime, "token_states", None))


def no_token_states(kind: str) -> str:
    """Why a runtime of `kind` gives no token states, and where they come from (the route's 424, the API's error)."""
    return (f"this artifact's runtime ({kind}) returns pooled vectors alone: token states come from a native, torch, "
            f"ONNX Runtime or OpenVINO variant (an ONNX artifact exported before 2026-12-07: build it again)")


def masked_states(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, T, H) token states with zeros where the (B, T) attention mask drops a token (`token_states`' contract)."""
    return states * mask[..., None].astype(states.dtype)


def default_threads() -> int:
    """One runtime thread per logical CPU this process may use (`hardware.usable_cpus`): hyper-threads
    count, so on a machine with SMT pass --threads <physical cores> if that measures faster."""
    return hardware.usable_cpus()


def check_batch(batch: dict[str, np.ndarray], input_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Validate and complete a batch: int64 (B, T) arrays, token_type_ids defaulting to zeros."""
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise MillisError("a batch needs input_ids and attention_mask")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise MillisError(f"input_ids must be a non-empty (batch, seq) array, got shape {ids.shape}")
    out = {}
    for n in input_names:
        a = batch.get(n)
        a = np.zeros_like(ids) if a is None and n == "token_type_ids" else np.asarray(a)
        if a.shape != ids.shape:
            raise MillisError(f"{n} has shape {a.shape}, input_ids has {ids.shape}")
        out[n] = np.ascontiguousarray(a, dtype=np.int64)
    return out
