"""A Hugging Face model and its tokenizer loaded with transformers (float32, eval mode), or one clear error."""

from __future__ import annotations

from pathlib import Path

import torch

from ggufmoe.errors import GgufmoeError


def load_model(model_dir: Path, progress: bool = True):
    """(tokenizer, float32 model in eval mode) or one clear error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(model_dir)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises many types for unloadable models
        raise _cannot_load(model_dir, e) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or one clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many types for unloadable tokenizers
        raise _cannot_load(model_dir, e) from None


def _cannot_load(model_dir: Path, e: Exception) -> GgufmoeError:
    msg = " ".join(str(e).split()) or type(e).__name__
    return GgufmoeError(f"{model_dir}: transformers cannot load the model or tokenizer ({msg})")
