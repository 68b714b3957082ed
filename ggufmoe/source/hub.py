"""Models straight from the Hugging Face Hub: a repository id (``org/name``) turned into the local snapshot folder
in huggingface_hub's cache, holding the files a command reads and no others.

huggingface_hub does the rest: its cache (``HF_HOME``, ``HF_HUB_CACHE``), resumable downloads, ``HF_TOKEN`` for
gated and private repositories and ``HF_HUB_OFFLINE`` (the cache alone). A path that exists always wins over a
repository id of the same spelling.
"""

from __future__ import annotations

import glob
import json
import re
from enum import Enum
from pathlib import Path

from ggufmoe.errors import GgufmoeError, one_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What transformers' AutoConfig / AutoTokenizer and ggufmoe's own tokenizer reader read from a model folder.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILE_SUFFIXES = (".gguf", ".json", ".safetensors")  # a missing local file, not a repository
CACHE_PREFIX = "models--"  # huggingface_hub's folder of a model repository: models--ORG--NAME
SEPARATOR = "--"


class Files(Enum):
    """Which files a command needs."""

    CONFIG = "config"  # config.json alone: a plan from the configuration
    MODEL = "model"  # config, tokenizer, the safetensors index and the shards it names (or model.safetensors)


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub model repository ``org/name`` (not a file name such as ``a/b.gguf``)."""
    return (REPO_ID.fullmatch(text) is not None and ".." not in text and SEPARATOR not in text
            and not text.endswith((".git", *FILE_SUFFIXES)))


def local_source(src: str | Path, revision: str | None = None, files: Files = Files.MODEL,
                 progress: bool = True) -> Path:
    """``src`` itself when it exists or is no repository id (the command reports it), else :func:`snapshot`."""
    path = Path(src)
    if path.exists() or not is_repo_id(str(src)):
        if revision is not None and path.exists():
            raise GgufmoeError(f"{src}: a local path; --revision applies to a repository id of the Hugging Face Hub")
        if revision is not None:
            raise GgufmoeError(f"{src}: neither a local path nor a repository id of the Hugging Face Hub (org/name)")
        return path
    return snapshot(str(src), revision, files, progress)


def snapshot(repo_id: str, revision: str | None = None, files: Files = Files.MODEL, progress: bool = True) -> Path:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default: main) with ``files`` in it, downloaded
    where missing; for :attr:`Files.CONFIG` its config.json, which plans from the configuration alone whatever else
    the cache holds."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        folder = _download(repo_id, revision, CONFIG_FILES if files is Files.CONFIG else CONFIG_FILES + TOKENIZER_FILES)
        if files is Files.MODEL:
            commit = folder.name  # snapshots/COMMIT: the shards of the very commit the index came from
            if (folder / INDEX).is_file():
                _download(repo_id, commit, [glob.escape(s) for s in _shards(folder / INDEX)])
            else:
                _download_file(repo_id, commit, SINGLE, revision)
    except GgufmoeError:
        raise
    except Exception as e:
        if (err := _error(e, repo_id, revision)) is None:
            raise
        raise err from e
    finally:
        if quiet:
            enable_progress_bars()
    needed = list(CONFIG_FILES)
    if files is Files.MODEL:
        needed += _shards(folder / INDEX) if (folder / INDEX).is_file() else [SINGLE]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise _missing(repo_id, revision, missing[0])
    return folder if files is Files.MODEL else folder / CONFIG_FILES[0]


def repository_name(path: str | Path) -> str:
    """The name a model goes by: for a snapshot in the Hugging Face cache (``models--ORG--NAME/snapshots/COMMIT``)
    the repository's ``NAME``, else the folder's name."""
    path = Path(path).resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith(CACHE_PREFIX):
        return repo.rsplit(SEPARATOR, 1)[-1]
    return path.name


def _download(repo_id: str, revision: str | None, patterns: list[str] | tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))


def _download_file(repo_id: str, commit: str, name: str, revision: str | None) -> None:
    """One file of the snapshot; a repository without it is refused by name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id, name, revision=commit)
    except LocalEntryNotFoundError:
        raise
    except EntryNotFoundError as e:
        raise GgufmoeError(f"{repo_id}: no {INDEX} or {name} (safetensors weights) in the repository "
                           f"(revision {revision or 'main'}); only those are read") from e


def _shards(index: Path) -> list[str]:
    """The shard files a safetensors index names, in order."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GgufmoeError(f"{index}: not a safetensors index ({one_line(e)})") from e


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _missing(repo_id: str, revision: str | None, name: str | None = None) -> GgufmoeError:
    """A file (or, without ``name``, the snapshot) neither in the cache nor downloaded."""
    what = f"{repo_id}{f' {name}' if name else ''} (revision {revision or 'main'})"
    if _offline():
        return GgufmoeError(f"{what}: not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    if name:
        return GgufmoeError(f"{what}: not in the repository (nor in the Hugging Face cache)")
    return GgufmoeError(f"{what}: not in the Hugging Face cache, and the Hub could not be reached")


def _error(e: Exception, repo_id: str, revision: str | None) -> GgufmoeError | None:
    """One line for what huggingface_hub raised (None: not a download's error)."""
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(e, LocalEntryNotFoundError):
        return _missing(repo_id, revision)
    if isinstance(e, GatedRepoError):
        return GgufmoeError(f"{repo_id}: a gated repository: accept its terms on the Hugging Face Hub and set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return GgufmoeError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or gated: "
                            "set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return GgufmoeError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub")
    if isinstance(e, EntryNotFoundError):
        return GgufmoeError(f"{repo_id}: a file the safetensors index names is not in the repository ({one_line(e)})")
    if isinstance(e, (HfHubHTTPError, OSError, ValueError)):
        return GgufmoeError(f"{repo_id}: download from the Hugging Face Hub failed: {one_line(e)}")
    return None
