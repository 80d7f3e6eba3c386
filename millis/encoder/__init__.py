"""One Hugging Face encoder: source specs, loading (pruned shapes, task heads), tokenization and length buckets."""
