"""llama.cpp's model, opened as both llama.cpp runners open it (gguf_runner.py: generation, embed_runner.py:
embeddings): the backend started, every layer on the CPU, a file it cannot load refused by name. Imported in the
llamacpp venv only."""


def open_model(L, path: str):
    """L: the llama_cpp module; path: a GGUF file -> the llama_model pointer."""
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model
