"""GPU encoders: a compact BERT-family encoder with fused epilogues, run as CUDA graphs by
millis.runtimes.cuda. Importing this package needs torch only; Triton is used where present."""
from millis.gpu.encoder import DTYPES, Encoder, EncoderConfig, RunOptions, from_hf

__all__ = ["DTYPES", "Encoder", "EncoderConfig", "RunOptions", "from_hf"]
