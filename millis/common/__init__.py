"""What every stage shares: config primitives, errors, cache dir and hashing, hardware, readers, dtypes, numerics."""
