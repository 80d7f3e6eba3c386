"""One exception type for every user-facing failure: the message says what to do."""


class MillisError(Exception):
    """A clear, user-facing error (bad input, unsupported model, corrupted artifact...)."""
