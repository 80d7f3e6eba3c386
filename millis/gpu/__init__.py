"""GPU encoders: a compact BERT-family encoder with fused epilogues, run as CUDA graphs by
millis.runtimes.cuda. Importing this package needs torch only; Triton is used where present."""
from millis.gpu.encoder import Encoder, EncoderConfig, RunOptions, from_hf

__all__ = ["Encoder", "EncoderConfig", "RunOptions", "from_hf"]
