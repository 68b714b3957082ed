import json
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


@pytest.fixture(scope="session")
def chatml_model(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE whose tokenizer has ChatML turn tokens, EOS <|im_end|> and a ChatML chat template."""
    out = tmp_path_factory.mktemp("chatml") / "hf"
    config = tiny_models.configs()["qwen3moe"]
    config.vocab_size = tiny_models.VOCAB + 2
    tiny_models.build("qwen3moe", out, config=config)
    tok = json.loads((out / "tokenizer.json").read_text())
    for i, text in enumerate(("<|im_start|>", "<|im_end|>"), start=tiny_models.VOCAB):
        tok["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                           "chat_template": tiny_models.QWEN_CHATML}))
    return out


@pytest.fixture(scope="session")
def chatml_gguf(chatml_model, tmp_path_factory) -> Path:
    from ggufmoe.pipeline.convert import ConvertOptions, convert
    from ggufmoe.quant.rules import TypeRules

    out = tmp_path_factory.mktemp("chatml-gguf") / "tiny-chat.gguf"
    return convert(chatml_model, ConvertOptions(out=out, types=TypeRules.parse("Q8_0"), progress=False))[0]


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A real Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``), one CPU each; its address.
    Skips the test when Ray is not installed (it is an optional extra)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ggufmoe[ray]')")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 << 20,
                                                                include_dashboard=False))
    cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()
