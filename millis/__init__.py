"""millis: make transformer inference millisecond-fast, and prove it.

    import millis
    model = millis.load("artifacts/minilm")          # an artifact written by `millis optimize`
    from millis.optimize import OptimizeConfig, optimize  # the pipeline: optimize(OptimizeConfig(...))
"""
__version__ = "0.1.0"

from millis.artifact.model import Model, load  # noqa: E402
from millis.common.errors import MillisError  # noqa: E402

__all__ = ["__version__", "load", "Model", "MillisError"]
