"""The encoder server: Starlette app over an artifact, with one `Batcher` that owns the queue."""
