"""Opening a GGUF file that a user named: every damage ends in one :class:`GgufmoeError` line."""

from __future__ import annotations

from pathlib import Path

import gguf

from .errors import GgufmoeError, one_line


def read_gguf(path: str | Path, what: str = "GGUF") -> gguf.GGUFReader:
    """gguf-py's reader for ``path``, with every metadata value decoded once up front.

    gguf-py decodes strings only when asked; a damaged byte in a key's value would otherwise
    surface later as a ``UnicodeDecodeError`` deep in whichever code reads that key.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
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
