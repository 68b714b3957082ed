"""Models straight from the Hugging Face Hub (ggufmoe/source/hub.py): a repository id resolved offline by
huggingface_hub itself, from a cache laid out as huggingface_hub writes it (refs, blobs, snapshots of symlinks)
and holding the reference model; the installed ``ggufmoe`` runs with HF_HUB_CACHE and HF_HUB_OFFLINE=1."""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import tiny_models
from cli_run import GGUFMOE, assert_one_line_error, run
from ggufmoe.source.hub import is_repo_id, repository_name

REF = tiny_models.REF_MODEL
REPO, PARTIAL = "org/refmoe-qwen3", "org/partial"
MAIN, TAGGED = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "model.safetensors.index.json", *(f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)))


def add_repo(cache: Path, repo: str, refs: dict[str, str], files: tuple[str, ...]) -> Path:
    """``repo`` in ``cache`` as huggingface_hub lays it out: ``files`` of the reference model as blobs, a snapshot of
    symlinks to them for each commit ``refs`` names."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for name in files:
            blob = root / "blobs" / hashlib.sha256(name.encode()).hexdigest()
            if not blob.exists():
                shutil.copyfile(REF / name, blob)
            (snap / name).symlink_to(Path("../../blobs") / blob.name)
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, str]:
    """The environment of an offline run against a cache holding REPO (main, tag v1 at another commit) and PARTIAL
    (one shard missing)."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "cache"
    add_repo(cache, REPO, {"main": MAIN, "v1": TAGGED}, MODEL_FILES)
    add_repo(cache, PARTIAL, {"main": MAIN}, MODEL_FILES[:-1])
    return {"HF_HOME": str(tmp / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}


def snapshot(env: dict[str, str], commit: str = MAIN, repo: str = REPO) -> Path:
    return Path(env["HF_HUB_CACHE"]) / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def test_repo_ids_and_names(tmp_path):
    assert is_repo_id("Qwen/Qwen3-30B-A3B") and is_repo_id("deepseek-ai/DeepSeek-V3.1")
    for text in ("models", "./a/b", "/a/b", "a/b/c", "a--b/c", "a/b..c", "a/model.gguf", "a/config.json", "a/b.git"):
        assert not is_repo_id(text), text
    snap = tmp_path / "models--org--name" / "snapshots" / MAIN
    snap.mkdir(parents=True)
    assert repository_name(snap) == "name" and repository_name(REF) == "refmoe-qwen3"


def test_convert_from_the_cache_is_the_local_conversion(hub, tmp_path):
    local, remote = tmp_path / "local.gguf", tmp_path / "hub.gguf"
    for src, out in ((REF, local), (REPO, remote)):
        proc = run("convert", src, "-o", out, "--type", "Q8_0", "-q", env=hub)
        assert proc.returncode == 0, proc.stderr
    assert local.read_bytes() == remote.read_bytes()  # general.name too: the repository's, not the commit's


def test_cache_miss_offline_is_one_line(hub, tmp_path):
    out = tmp_path / "x.gguf"
    assert_one_line_error(run("convert", "org/absent", "-o", out, "--type", "F16", env=hub),
                          "org/absent", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert_one_line_error(run("convert", PARTIAL, "-o", out, "--type", "F16", env=hub),
                          PARTIAL, MODEL_FILES[-1], "HF_HUB_OFFLINE")
    assert_one_line_error(run("inspect", REPO, "--revision", "v2", env=hub), REPO, "v2", "HF_HUB_OFFLINE")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_revision_branch_tag_or_commit(hub):
    for revision, commit in ((None, MAIN), ("main", MAIN), ("v1", TAGGED), (TAGGED, TAGGED), (MAIN, MAIN)):
        proc = run("inspect", REPO, *(["--revision", revision] if revision else []), env=hub)
        assert proc.returncode == 0, proc.stderr
        assert f"source        {snapshot(hub, commit)}\n" in proc.stdout


def test_plan_from_the_configuration(hub, tmp_path):
    proc = run("plan", REPO, "--budget", "400M", "-o", tmp_path / "p.json", "-q", env=hub)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"note: planning {REPO} from its configuration alone") and "wrote" in proc.stdout
    # the snapshot is an input: an output there (a symlink into the cache's blobs) is refused after the note
    proc = run("plan", REPO, "--budget", "400M", "-o", snapshot(hub) / "config.json", env=hub)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error: "), proc.stderr
    assert "would overwrite the input" in proc.stderr and len(proc.stderr.splitlines()) == 2


def test_a_local_path_wins(hub, tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / REPO).symlink_to(REF)
    proc = subprocess.run([GGUFMOE, "inspect", REPO], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **hub})
    assert proc.returncode == 0 and proc.stdout.startswith(f"source        {REPO}\n"), proc.stderr
    proc = subprocess.run([GGUFMOE, "inspect", REPO, "--revision", "v1"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, **hub})
    assert_one_line_error(proc, REPO, "a local path", "--revision")
    assert_one_line_error(run("inspect", tmp_path / "missing", env=hub), "missing")  # neither: today's error


@pytest.mark.parametrize("error, words", [("RepositoryNotFoundError", "no such repository on the Hugging Face Hub"),
                                          ("GatedRepoError", "gated repository"),
                                          ("RevisionNotFoundError", "no revision 'v9'")])
def test_hub_errors_are_one_line(monkeypatch, error, words):
    """What the Hub answers online, as huggingface_hub raises it (built without a response: the class is what counts)."""
    import huggingface_hub
    from huggingface_hub import utils

    from ggufmoe.errors import GgufmoeError
    from ggufmoe.source.hub import snapshot as fetch

    cls = getattr(utils, error)

    def refuse(*args, **kwargs):
        e = cls.__new__(cls)
        Exception.__init__(e, "404 Client Error\n\nRepository Not Found for url: https://huggingface.co/api/...")
        raise e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(GgufmoeError, match=words) as raised:
        fetch(REPO, "v9")
    assert str(raised.value).startswith(f"{REPO}: ") and "\n" not in str(raised.value)
