"""`millis serve`: an HTTP server over an optimized artifact (encoder/: one queue owner that batches) or a
decoder (generation/: one engine), both on one HTTP layer (http, metrics, openapi)."""
from millis.serve.config import ServeConfig


def serve(cfg: ServeConfig, loader=None) -> int:
    """Serve cfg.artifact until SIGTERM; see millis.serve.server (imported here: uvicorn loads lazily)."""
    from millis.serve.server import serve as _serve

    return _serve(cfg, loader)


__all__ = ["ServeConfig", "serve"]
