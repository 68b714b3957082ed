"""GGUF files as a user names them: the magic check, split shard names, and opening a file so that
every damage ends in one :class:`GgufmoeError` line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from ggufmoe.errors import GgufmoeError, one_line

MAGIC = b"GGUF"
_SHARD = re.compile(r"(?P<base>.+)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf")


@dataclass(frozen=True)
class ShardName:
    """A split GGUF's shard name, llama.cpp style: ``BASE-0000i-of-0000N.gguf``."""

    base: str
    index: int
    count: int

    @classmethod
    def parse(cls, name: str) -> "ShardName | None":
        m = _SHARD.fullmatch(name)
        return cls(m["base"], int(m["no"]), int(m["n"])) if m else None

    def name(self, index: int) -> str:
        return f"{self.base}-{index:05d}-of-{self.count:05d}.gguf"


def is_shard_of(name: str, stem: str) -> bool:
    """Whether ``name`` is a shard name a split output called ``stem``.gguf would be written as."""
    shard = ShardName.parse(name)
    return shard is not None and shard.base == stem


def has_magic(path: Path, what: str = "GGUF") -> bool:
    """Whether ``path`` starts with the GGUF magic; a one-line error when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def gguf_files(path: str | Path) -> list[Path]:
    """The files of a GGUF: itself, or every shard of a split ``NAME-0000i-of-0000N.gguf``."""
    path = Path(path)
    shard = ShardName.parse(path.name)
    files = [path] if shard is None else [path.with_name(shard.name(i)) for i in range(1, shard.count + 1)]
    for f in files:
        if not f.is_file():
            raise GgufmoeError(f"{f}: no such file" + (" (a shard of a split GGUF)" if shard else ""))
    if not has_magic(files[0]):
        raise GgufmoeError(f"{files[0]}: not a GGUF file")
    return files


def read_gguf(path: str | Path, what: str = "GGUF") -> gguf.GGUFReader:
    """gguf-py's reader for ``path``, with every metadata value decoded once up front.

    gguf-py decodes strings only when asked; a damaged byte in a key's value would otherwise
    surface later as a ``UnicodeDecodeError`` deep in whichever code reads that key.
    """
    path = Path(path)
    try:
        if not has_magic(path, what):
            raise GgufmoeError(f"{path}: not a {what} file")
        reader = gguf.GGUFReader(path)
        for field in reader.fields.values():
            field.contents()
    except GgufmoeError:
        raise
    except OSError as e:
        raise GgufmoeError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # the reader raises ValueError, IndexError, struct and Unicode errors... on damage
        raise GgufmoeError(f"{path}: truncated or corrupt {what} ({one_line(e)})") from None
    if reader.byte_order != "I":
        raise GgufmoeError(f"{path}: big-endian GGUF files are not supported")
    return reader
