import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

# The suite (and CI) replays the same fuzz cases every run; HYPOTHESIS_PROFILE=explore draws new
# ones with many more examples, for hunting.
settings.register_profile("suite", max_examples=150, derandomize=True)
settings.register_profile("explore", max_examples=3000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# The tests Ctrl-C `ggufmoe` processes with a real SIGINT. A suite started in the background of a
# non-interactive shell inherits SIGINT ignored, and an ignored signal stays ignored across exec, so
# those children would never see it; with a handler here, each child starts with the default again.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def eval_tokens() -> list[int]:
    """1024 token ids of the evaluation text (reference tokenizer)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_models.REF_MODEL / "tokenizer.json"))
    text = (tiny_models.TEST_DATA / "eval_doc.txt").read_text()[:20000]
    return tok.encode(text, add_special_tokens=False).ids[:1024]


@pytest.fixture(scope="session")
def ref_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models.REF_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ref_f32_gguf(tmp_path_factory) -> Path:
    """The reference model converted to F32 once per session."""
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    out = tmp_path_factory.mktemp("ref") / "ref-f32.gguf"
    return convert(tiny_models.REF_MODEL, ConvertOptions(out=out, types=TypeRules.parse("F32"), progress=False))[0]
