"""Exact GGUF file sizes before anything is written, from a ``GGUFWriter``'s declared state.

Sizes follow the GGUF v3 layout as gguf-py writes it: per shard a header (magic, version, tensor
count, KV count), the KV pairs (with the ``split.*`` keys gguf-py adds on every shard of a split
output), the tensor infos, zero padding to the data alignment, then each tensor's data padded to
the alignment. Serialised sizes are computed here from the value types (no gguf-py internals).
"""

from __future__ import annotations

from collections import OrderedDict

from gguf import GGUFValueType as V, GGUFWriter
from gguf.constants import Keys

_FIXED = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
          V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
HEADER = 4 + 4 + 8 + 8  # magic, version, tensor count, KV count
# Bytes of the big string arrays seen last (the tokenizer's tokens and merges, the same list objects in every
# header a planner counts): array id -> (the array, its bytes). Arrays are never changed once added to a writer.
_COUNTED: OrderedDict[int, tuple[list, int]] = OrderedDict()
_COUNTED_MIN_ITEMS, _COUNTED_MAX = 1024, 8


def string_bytes(s: str | bytes) -> int:
    """A GGUF string: its u64 length, then its UTF-8 bytes."""
    return 8 + len(s.encode("utf-8") if isinstance(s, str) else s)


def value_bytes(value, vtype: V, sub_type: V | None = None) -> int:
    """Bytes of a value as stored after its type tag (an array: item type, count, items)."""
    if vtype == V.STRING:
        return string_bytes(value)
    if vtype == V.ARRAY:  # gguf-py takes an untyped array's item type from its first item
        if sub_type is None:
            sub_type = V.UINT8 if isinstance(value, bytes) else V.get_type(value[0])
        if sub_type == V.STRING:
            return 4 + 8 + _strings_bytes(value)
        if sub_type == V.ARRAY:
            return 4 + 8 + sum(value_bytes(v, V.ARRAY) for v in value)
        return 4 + 8 + _FIXED[sub_type] * len(value)
    return _FIXED[vtype]


def _strings_bytes(items: list) -> int:
    """Bytes of a string array's items, counted once for a big array."""
    hit = _COUNTED.get(id(items))
    if hit is not None and hit[0] is items:
        return hit[1]
    n = sum(string_bytes(v) for v in items)
    if len(items) >= _COUNTED_MIN_ITEMS:
        _COUNTED[id(items)] = (items, n)
        if len(_COUNTED) > _COUNTED_MAX:
            _COUNTED.popitem(last=False)
    return n


def _kv(w: GGUFWriter, shard: int) -> dict[str, tuple[object, V, V | None]]:
    """The KV pairs shard ``shard`` will have: what was added, plus the split keys gguf-py adds at
    write time (``GGUFWriter.add_shard_kv_data``) when there is more than one shard."""
    kv = {k: (v.value, v.type, v.sub_type) for k, v in (w.kv_data[shard] if shard < len(w.kv_data) else {}).items()}
    if len(w.tensors) > 1:
        kv[Keys.Split.LLM_KV_SPLIT_NO] = (shard, V.UINT16, None)
        kv[Keys.Split.LLM_KV_SPLIT_COUNT] = (len(w.tensors), V.UINT16, None)
        kv[Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT] = (sum(len(t) for t in w.tensors), V.INT32, None)
    return kv


def header_bytes(w: GGUFWriter, shard: int) -> int:
    """Bytes of shard ``shard`` before its tensor data: header, KV pairs and tensor infos."""
    n = HEADER
    for key, (value, vtype, sub_type) in _kv(w, shard).items():
        n += string_bytes(key) + 4 + value_bytes(value, vtype, sub_type)
    for name, ti in w.tensors[shard].items():
        n += string_bytes(name) + 4 + 8 * len(ti.shape) + 4 + 8  # name, dims, shape, type, offset
    return n


def shard_bytes(w: GGUFWriter) -> list[int]:
    """Exact size of each file ``w`` will write, given all metadata and tensor infos declared. The
    alignment is the writer's (``general.alignment`` when set, else 32). A shard without tensors
    (only with ``small_first_shard``) ends after its tensor infos, as :class:`GGUFOutput` writes it."""
    align = w.data_alignment
    sizes = []
    for i, tensors in enumerate(w.tensors):
        n = header_bytes(w, i)
        if tensors:
            n = GGUFWriter.ggml_pad(n, align)
            n += sum(GGUFWriter.ggml_pad(ti.nbytes, align) for ti in tensors.values())
        sizes.append(n)
    return sizes


def file_bytes(w: GGUFWriter) -> int:
    """Exact number of bytes the output of ``w`` will have, summed over its shards."""
    return sum(shard_bytes(w))
