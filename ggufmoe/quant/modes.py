"""Who chooses the codes of a quantized tensor (``convert --rounding``)."""

from __future__ import annotations

from enum import StrEnum


class RoundingMode(StrEnum):
    LLAMA = "llama"  # llama.cpp's quantizers, from the weights and the importance matrix
    AWARE = "aware"  # output-aware codes from the layers' real inputs (ggufmoe.quant.aware), where they do better
