"""Task heads as torch modules, so pooling and normalisation live inside the exported graph.

classify: (input_ids, attention_mask[, token_type_ids]) -> logits (B, num_labels)
embed:    (input_ids, attention_mask[, token_type_ids]) -> embedding (B, H); SPLADE pooling: (B, vocab), from a
          masked-LM's logits (splade_pool). With `with_states` (the exported graph): (embedding, token_states
          (B, T, H)), every token's last hidden state before pooling, unmasked.
"""
from __future__ import annotations

import torch
from torch import nn

from millis.common.errors import MillisError
from millis.encoder.hf import load_hf
from millis.encoder.source import OUTPUT_NAME  # noqa: F401 -- read here too
from millis.encoder.source import LAST_TOKEN, SPLADE, ModelSource, Pooling


def splade_pool(logits: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-LM logits (B, T, V), mask (B, T) of 0/1 -> (B, V): max over the kept tokens of log(1 + relu(logit)), as
    sentence-transformers' SpladePooling. The max first (log1p and relu are monotone): one (B, T, V) temporary, not
    three (B8 x T512 at BERT's 30,522 ids: 0.5 GB less); a row with no token: -inf, so 0. `bias` (V,): the logits'
    bias, added after the max in float32 (the same values: rounding is monotone), so logits in fp16 / bf16 (the CUDA
    form's) are maxed in their own dtype: no float32 (B, T, V) copy."""
    top = logits.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
    if bias is not None:
        top = top.float() + bias
    return torch.log1p(torch.relu(top))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    # hidden (B, T, H), mask (B, T) of 0/1 -> (B, H)
    if pooling.mode == SPLADE:
        raise MillisError("SPLADE pools a masked-LM's logits, not hidden states (splade_pool)")
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == LAST_TOKEN:  # each row's last kept token (right or left padding); a row with none: zeros
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last] * m.amax(dim=1)
    elif pooling.mode == "max":
        out = (hidden + (m - 1.0) * 1e9).amax(dim=1)
    else:
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if pooling.normalize:
        out = nn.functional.normalize(out, p=2.0, dim=-1)
    return out


class TaskModel(nn.Module):
    """Wraps a HF encoder so its single output is exactly what the task needs."""

    def __init__(self, hf_model: nn.Module, task: str, pooling: Pooling, input_names: tuple[str, ...]):
        super().__init__()
        self.hf, self.task, self.pooling = hf_model, task, pooling
        self.takes_token_types = "token_type_ids" in input_names
        self.with_states = False  # forward returns (output, token_states) too: set for an embedder's export

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.hf(**self.inputs(input_ids, attention_mask, token_type_ids),
                      output_hidden_states=self.heads_logits() and self.with_states)
        if self.task == "classify":
            return out.logits
        if self.pooling.mode == SPLADE:
            v = splade_pool(out.logits, attention_mask)
            v = nn.functional.normalize(v, p=2.0, dim=-1) if self.pooling.normalize else v
        else:
            v = pool(out.last_hidden_state, attention_mask, self.pooling)
        return (v, self.last_states(out)) if self.with_states else v

    def token_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, T, H): the encoder's last hidden state (under a classifier's or a masked LM's head), unmasked."""
        out = self.hf(**self.inputs(input_ids, attention_mask, token_type_ids), output_hidden_states=self.heads_logits())
        return self.last_states(out)

    def heads_logits(self) -> bool:
        """The wrapped model ends in a head (sequence classification, SPLADE's masked LM): its outputs carry the
        encoder's states only as hidden_states."""
        return self.task == "classify" or self.pooling.mode == SPLADE

    def last_states(self, out) -> torch.Tensor:
        return out.hidden_states[-1] if self.heads_logits() else out.last_hidden_state

    def inputs(self, input_ids, attention_mask, token_type_ids) -> dict[str, torch.Tensor]:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_token_types:
            kw["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        return kw


EAGER_ONLY = frozenset({"mpnet", "deberta-v2"})  # transformers has no SDPA attention for them (relative positions)
POOLERS = frozenset({"bert", "roberta", "xlm-roberta", "mpnet"})  # AutoModel builds a pooler unless told not to


def base_model_kwargs(model_type: str) -> dict:
    """AutoModel's arguments for an embedder's bare encoder: without the pooler it never reads."""
    return {"add_pooling_layer": False} if model_type in POOLERS else {}


def load_task_model(src: ModelSource, task: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32) -> TaskModel:
    """Load the HF weights for `task`. attn="eager" gives the attention pattern ORT fuses."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # silence "some weights were not used" for the dropped head
    hf_logging.disable_progress_bar()
    if src.model_type in EAGER_ONLY:
        attn = "eager"
    if task == "classify":
        if not src.has_classifier:
            raise MillisError(f"{src.spec} has no sequence-classification head (architectures in config.json); "
                              f"fine-tune one first, or use --task embed")
        hf = load_hf(src.path, AutoModelForSequenceClassification, attn_implementation=attn, dtype=dtype)
    elif src.pooling.mode == SPLADE:  # the masked-LM head: its vocabulary logits are what SPLADE pools
        hf = load_hf(src.path, AutoModelForMaskedLM, attn_implementation=attn, dtype=dtype)
    else:
        hf = load_hf(src.path, AutoModel, attn_implementation=attn, dtype=dtype, **base_model_kwargs(src.model_type))
    return TaskModel(hf.eval(), task, src.pooling, src.input_names).eval()
