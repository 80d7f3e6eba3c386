"""`millis optimize` in stage order: build/ (export, fuse, quantize, openvino, variants) -> judge
(fidelity and accuracy gates) -> recover -> measure -> select -> report; `pipeline.optimize` runs them.

    from millis.optimize import OptimizeConfig, optimize
    optimize(OptimizeConfig(source="builtin:minilm", task="embed", out="artifacts/minilm"))
"""
from millis.optimize.config import OptimizeConfig


def __getattr__(name: str):
    if name == "optimize":  # imported on first use: the pipeline pulls in torch and the runtimes
        from millis.optimize.pipeline import optimize

        return optimize
    raise AttributeError(f"module 'millis.optimize' has no attribute {name!r}")


__all__ = ["OptimizeConfig", "optimize"]
