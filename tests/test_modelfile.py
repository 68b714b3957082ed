"""Ollama Modelfiles: written from real GGUFs (ours and foreign), checked by the format parser."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest

import tiny_models
from cli_run import run
from tiny_models import QWEN_CHATML
from ggufmoe.errors import GgufmoeError
from ggufmoe.gguf.modelfile import (CHATML_TEMPLATE, LLAMA3_TEMPLATE, Modelfile, build_modelfile, chat_family,
                               go_template, parse_modelfile, render_modelfile, write_modelfile)

MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
           "{% endif %}{% endfor %}")
MISTRAL_V3 = ("{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
              "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
              "{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")
DEEPSEEK_V3 = ("{{ bos_token }}{{ ns.system_prompt }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{'<｜User｜>' + message['content']}}{% endif %}{% if message['role'] == 'assistant' %}"
               "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")
DEEPSEEK_R1 = DEEPSEEK_V3.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
UNKNOWN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}Assistant:"


def instructions(path: Path) -> list[tuple[str, str, str]]:
    return [(i.command, i.key, i.value) for i in parse_modelfile(path.read_text(encoding="utf-8"))]


def blocks_balanced(template: str) -> bool:
    """Every Go ``if``/``range``/``with`` action has its ``end``, never more ends than opens."""
    depth = 0
    for action in re.findall(r"\{\{-?\s*(\w+)", template):
        depth += action in ("if", "range", "with")
        depth -= action == "end"
        if depth < 0:
            return False
    return depth == 0 and template.count("{{") == template.count("}}")


def foreign_gguf(path: Path, arch: str, tokens: list[str], eos: int, template: str | None,
                 context_length: int | None = 131072) -> Path:
    """A GGUF with metadata only, written by gguf-py as other converters do."""
    w = gguf.GGUFWriter(path, arch)
    if context_length:
        w.add_context_length(context_length)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_eos_token_id(eos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_chatml_modelfile(chatml_gguf):
    path = write_modelfile(chatml_gguf)
    assert path == chatml_gguf.with_name("tiny-chat.Modelfile")
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "FROM ./tiny-chat.gguf"
    assert (path.parent / "./tiny-chat.gguf").resolve() == chatml_gguf.resolve()
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text
    assert instructions(path) == [
        ("from", "", "./tiny-chat.gguf"),
        ("template", "", CHATML_TEMPLATE),
        ("parameter", "stop", "<|im_end|>"),  # EOS first
        ("parameter", "stop", "<|im_start|>"),
        ("parameter", "stop", "<|endoftext|>"),
        ("parameter", "num_ctx", "2048"),  # the model's context (< 8192)
    ]
    assert not [line for line in text.splitlines() if line.startswith("#")]


def test_ctx_and_output_elsewhere(chatml_gguf, tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_modelfile(chatml_gguf, tmp_path / "sub" / "chat.Modelfile", ctx=512)
    ins = parse_modelfile(path.read_text(encoding="utf-8"))
    assert ins[0].command == "from" and ins[0].value.startswith("../")
    assert (path.parent / ins[0].value).resolve() == chatml_gguf.resolve()
    assert ins[-1].key == "num_ctx" and ins[-1].value == "512"
    assert write_modelfile(chatml_gguf, tmp_path) == tmp_path / "tiny-chat.Modelfile"  # a directory
    with pytest.raises(GgufmoeError, match="does not exist"):
        write_modelfile(chatml_gguf, tmp_path / "no" / "x.Modelfile")


@pytest.mark.parametrize("jinja, family, pieces", [
    (QWEN_CHATML, "chatml", [CHATML_TEMPLATE]),
    (LLAMA3, "llama3", [LLAMA3_TEMPLATE]),
    (MIXTRAL, "mistral", ["[INST] ", "{{ .Content }} [/INST]", '"assistant" }}{{ .Content }}</s>', "$.System"]),
    (MISTRAL_V3, "mistral", ["{{ .Content }}[/INST]", '"assistant" }} {{ .Content }}</s>']),
    (DEEPSEEK_V3, "deepseek3", ["<｜User｜>{{ .Content }}", "<｜end▁of▁sentence｜>", "{{- end }}<｜Assistant｜>"]),
    (DEEPSEEK_R1, "deepseek3", ["{{- end }}<｜Assistant｜><think>\n"]),
])
def test_families(jinja, family, pieces):
    fam = chat_family(jinja)
    assert fam is not None and fam.name == family
    template = go_template(fam, jinja)
    assert blocks_balanced(template) and ".Messages" in template
    for piece in pieces:
        assert piece in template
    assert parse_modelfile(render_modelfile(Modelfile("./m.gguf", template, list(fam.stops))))[1].value == template
    assert chat_family(UNKNOWN) is None


def test_foreign_llama3_gguf(tmp_path):
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "a"]
    src = foreign_gguf(tmp_path / "llama3.gguf", "llama", tokens, eos=4, template=LLAMA3)
    m = build_modelfile(src, tmp_path / "llama3.Modelfile")
    assert (m.from_path, m.template, m.num_ctx) == ("./llama3.gguf", LLAMA3_TEMPLATE, 8192)  # 131072 capped
    assert m.stops == ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"]  # no <|eom_id|> in the vocab
    assert build_modelfile(src, tmp_path / "x.Modelfile", ctx=65536).num_ctx == 65536


def test_unrecognised_or_missing_template(tmp_path):
    src = foreign_gguf(tmp_path / "odd.gguf", "olmoe", ["<s>", "</s>", "b"], eos=1, template=UNKNOWN,
                       context_length=4096)
    text = write_modelfile(src).read_text(encoding="utf-8")
    assert "\nTEMPLATE" not in text
    assert any(line.startswith("# chat template not recognised") for line in text.splitlines())
    assert [(c, k, v) for c, k, v in instructions(tmp_path / "odd.Modelfile")] == [
        ("from", "", "./odd.gguf"), ("parameter", "stop", "</s>"), ("parameter", "num_ctx", "4096")]

    bare = foreign_gguf(tmp_path / "bare.gguf", "llama", ["<s>", "</s>"], eos=1, template=None, context_length=None)
    m = build_modelfile(bare, tmp_path / "bare.Modelfile")
    assert m.template is None and m.num_ctx is None and m.stops == ["</s>"]
    assert any("no chat template" in c for c in m.comments) and any("context_length" in c for c in m.comments)


def test_convert_ollama_split(chatml_model, tmp_path):
    proc = run("convert", chatml_model, "-o", tmp_path / "s.gguf", "--type", "Q8_0", "-q", "--split-max-size", "300K",
               "--ctx", "1024", "--ollama")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(shards) >= 2
    path = tmp_path / "s.Modelfile"
    assert f"wrote {path}" in proc.stdout
    ins = instructions(path)
    assert ins[0] == ("from", "", f"./{shards[0].name}")
    assert ("template", "", CHATML_TEMPLATE) in ins
    assert ins[-1] == ("parameter", "num_ctx", "1024")  # --ctx given: used
    # the modelfile command finds the shards from the unsplit name, and the same file comes out
    out = run("modelfile", tmp_path / "s.gguf", "--ctx", "1024", "-o", tmp_path / "again.Modelfile")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "again.Modelfile").read_text() == path.read_text()


def test_convert_ollama_reference_tokenizer(tmp_path):
    tiny_models.build("qwen3moe", tmp_path / "hf")  # the reference tokenizer: no chat template
    proc = run("convert", tmp_path / "hf", "-o", tmp_path / "plain.gguf", "--type", "Q8_0", "-q", "--ollama")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "plain.Modelfile").read_text()
    assert text.startswith("FROM ./plain.gguf\n") and "\nTEMPLATE" not in text
    assert '\nPARAMETER stop "<|endoftext|>"\n' in text
    assert text.endswith("\nPARAMETER num_ctx 2048\n")  # --ctx not given: the model's context


def test_modelfile_command_errors(tmp_path):
    for args, word in [((tmp_path / "nope.gguf",), "no such file"), ((Path(__file__),), "not a GGUF file")]:
        proc = run("modelfile", *args)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], proc.stderr


VALID = '''# comment
from ./m.gguf
# sampling
PARAMETER temperature 0.7
parameter top_k 40
PARAMETER stop "<|im_end|>"
PARAMETER stop """a "quoted" stop"""
PARAMETER use_mmap false
PARAMETER seed -1
SYSTEM """You are
helpful."""
system "two
lines"
MESSAGE user Hello there
MESSAGE assistant "Hi!"
ADAPTER ./lora.gguf
LICENSE """
MIT
"""
TEMPLATE {{ .Prompt }}
'''


def test_parser_accepts():
    ins = parse_modelfile(VALID)
    assert [i.command for i in ins] == ["from", "parameter", "parameter", "parameter", "parameter", "parameter",
                                        "parameter", "system", "system", "message", "message", "adapter", "license",
                                        "template"]
    assert ins[4].value == 'a "quoted" stop'
    assert ins[7].value == "You are\nhelpful." and ins[8].value == "two\nlines"
    assert (ins[9].key, ins[9].value, ins[10].value) == ("user", "Hello there", "Hi!")
    assert ins[12].value == "\nMIT\n" and ins[13].value == "{{ .Prompt }}"
    assert ins[7].line == 10 and ins[9].line == 14


@pytest.mark.parametrize("text, match", [
    ("", "no FROM"),
    ("# only a comment\n", "no FROM"),
    ("PARAMETER num_ctx 4096\n", "first instruction must be FROM"),
    ("SYSTEM hi\nFROM ./m.gguf\n", "line 1: the first instruction must be FROM"),
    ("FROM ./m.gguf\nFORM x\n", "line 2: unknown instruction 'FORM'"),
    ("FROM ./m.gguf\nPARAMETERS num_ctx 1\n", "unknown instruction"),
    ("FROM ./m.gguf\nTEMPLATE \"\"\"{{ .Prompt }}\nPARAMETER num_ctx 4\n", "line 2: unbalanced quotes"),
    ("FROM ./m.gguf\nSYSTEM \"hello\n", "unbalanced quotes"),
    ("FROM ./m.gguf\nTEMPLATE \"\"\"x\"\"\" y\n", "unbalanced quotes"),
    ("FROM ./m.gguf\nPARAMETER context 4096\n", "unknown parameter 'context'"),
    ("FROM ./m.gguf\nPARAMETER num_ctx 4k\n", "num_ctx needs an int value, got '4k'"),
    ("FROM ./m.gguf\nPARAMETER num_ctx 4096.0\n", "needs an int"),
    ("FROM ./m.gguf\nPARAMETER temperature warm\n", "temperature needs a float"),
    ("FROM ./m.gguf\nPARAMETER use_mmap yes\n", "use_mmap needs a bool"),
    ("FROM ./m.gguf\nPARAMETER stop\n", "PARAMETER needs a name and a value"),
    ("FROM ./m.gguf\nPARAMETER stop \"\"\n", "line 2: PARAMETER has no value"),
    ("FROM\n", "FROM has no value"),
    ("FROM ./m.gguf\nMESSAGE bot hi\n", "MESSAGE role 'bot'"),
])
def test_parser_rejects(text, match):
    with pytest.raises(GgufmoeError, match=re.escape(match)):
        parse_modelfile(text)
