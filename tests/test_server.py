"""The usual client: a ggufmoe GGUF served by llama-cpp-python's OpenAI-compatible server on localhost,
asked for a chat completion by the ``openai`` package."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

READY_DEADLINE = 120  # seconds for the server to load the model: generous, loaded CI machines are slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chatml_gguf, tmp_path_factory):
    """The server on ``chatml_gguf`` (its chat template is the one ggufmoe carried over from the
    checkpoint's tokenizer_config.json); yields its base URL and its log file."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(chatml_gguf),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=10):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer in {READY_DEADLINE} s:\n"
                                f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_chat_completion_with_the_openai_client(server):
    from openai import OpenAI

    base, log = server
    client = OpenAI(base_url=base, api_key="not-needed", timeout=120, max_retries=0)
    [model] = client.models.list().data
    reply = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hello, who are you?"}],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    served = log.read_text(errors="replace")
    assert "Available chat formats from metadata: chat_template.default" in served  # the GGUF's own template
    assert "Using fallback chat format" not in served
