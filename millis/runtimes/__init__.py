"""Runtimes: one small Protocol over a flat batch. A runtime never decides batching."""
from millis.runtimes.base import Runtime
from millis.runtimes.registry import open_runtime

__all__ = ["Runtime", "open_runtime"]
