"""Non-finite weights (NaN, ±Inf), found while the weights are read: refused with one line naming the
tensor, or (``convert --allow-nonfinite zero``) replaced with 0 and counted.

Checked: float values as read (float32 rows, whatever the source stores), and the stored bytes of
F32, F16 and BF16 tensors copied from a GGUF. The blocks of a quantized type copied as they are
(their scales included) are not.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from ggufmoe.errors import GgufmoeError

ZERO_HINT = "pass --allow-nonfinite zero to replace them with 0"
CALIBRATION_HINT = "calibration cannot use them"
ROUNDING_HINT = ("--rounding aware runs the model over the text and cannot use them (without it, "
                 "--allow-nonfinite zero replaces them with 0)")
BF16_EXPONENT = 0x7F80  # all ones: Inf or NaN

# how the stored bytes of a copied tensor are viewed as its values (BF16: its bits)
STORED_VALUES = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


def finite_mask(values: np.ndarray) -> np.ndarray:
    """Which of ``values`` are finite: floats, or BF16 bits (uint16)."""
    if values.dtype == np.uint16:
        return (values & BF16_EXPONENT) != BF16_EXPONENT
    return np.isfinite(values)


class NonFiniteError(GgufmoeError):
    """``count`` non-finite values in tensor ``name``, and what the user can do (``hint``)."""

    def __init__(self, name: str, count: int, hint: str):
        super().__init__(f"{name}: {count} non-finite value{'' if count == 1 else 's'} (NaN/Inf) in the source; {hint}")
        self.name, self.count = name, count

    def hinting(self, hint: str) -> "NonFiniteError":
        """The same values, another hint."""
        return NonFiniteError(self.name, self.count, hint)


def checked_finite(name: str, values: np.ndarray, hint: str = CALIBRATION_HINT) -> np.ndarray:
    """``values`` (of tensor ``name``), refused when one is not finite."""
    finite = finite_mask(values)
    if not finite.all():
        raise NonFiniteError(name, finite.size - np.count_nonzero(finite), hint)
    return values


class NonFinite:
    """The non-finite values of a conversion, counted per tensor as its parts are read: each part comes
    out with them set to 0, so nothing downstream sees one; at the tensor's end (:meth:`check`) they are
    refused unless ``replace``."""

    def __init__(self, replace: bool = False):
        self.replace = replace
        self.counts: dict[str, int] = {}  # tensor -> non-finite values found

    def clean(self, name: str, data: np.ndarray, stored: T | None = None) -> np.ndarray:
        """Part ``data`` of tensor ``name`` with its non-finite values set to 0: float values, or the stored
        bytes (uint8) of type ``stored``, which are returned as they are when that type is quantized."""
        if stored is None:
            values = data
        elif stored in STORED_VALUES:
            values = data.view(STORED_VALUES[stored])
        else:
            return data
        finite = finite_mask(values)
        n = finite.size - np.count_nonzero(finite)
        if n == 0:
            return data
        self.counts[name] = self.counts.get(name, 0) + n
        zeroed = np.where(finite, values, values.dtype.type(0))
        return zeroed if stored is None else zeroed.view(np.uint8)

    def check(self, name: str) -> None:
        """Tensor ``name`` is read whole: refused when it held non-finite values, unless they are replaced."""
        n = self.counts.get(name, 0)
        if n and not self.replace:
            raise NonFiniteError(name, n, ZERO_HINT)

    def summary(self) -> str | None:
        """One line on the values replaced, or None when there were none."""
        if not self.counts:
            return None
        n, names = sum(self.counts.values()), list(self.counts)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return (f"replaced {n} non-finite value{'' if n == 1 else 's'} (NaN/Inf) with 0 in {len(names)} "
                f"tensor{'' if len(names) == 1 else 's'} ({shown})")
