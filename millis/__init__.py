"""millis: make transformer inference millisecond-fast, and prove it."""
__version__ = "0.1.0"

from millis.api import Model, load  # noqa: E402
from millis.errors import MillisError  # noqa: E402


def optimize(cfg):
    """Run the optimize pipeline (see millis.optimize.optimize)."""
    from millis.optimize import optimize as _optimize
    return _optimize(cfg)


__all__ = ["__version__", "load", "optimize", "Model", "MillisError"]
