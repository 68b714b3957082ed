"""Calibration text: the pieces held out of calibration for the planner's probes."""

from __future__ import annotations

import tiny_models

from ggufmoe.stats.text import HOLD_OUT_CHARS, HOLD_OUT_EVERY, hold_out


def test_held_out_pieces_are_spread_and_disjoint() -> None:
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:400_000]
    split = hold_out(text)
    share = len(split.probes) / len(text)
    assert abs(share - 1 / HOLD_OUT_EVERY) < 0.03
    assert len(split.calibration) + len(split.probes) == len(text)
    # every held-out piece is a piece of the text, none of it in the calibration part
    first = split.probes[:HOLD_OUT_CHARS // 2]
    assert first in text and first not in split.calibration
    # spread: held-out text opens after the first few pieces and reaches the last eighth of the text
    assert text.index(first) >= HOLD_OUT_CHARS * (HOLD_OUT_EVERY // 2)
    last = split.probes[-HOLD_OUT_CHARS // 2:]
    assert text.index(last) > len(text) * (1 - 2 / HOLD_OUT_EVERY)
    # the calibration part opens as the text does: short calibrations see the same tokens as before
    assert split.calibration[:HOLD_OUT_CHARS * (HOLD_OUT_EVERY // 2)] == text[:HOLD_OUT_CHARS * (HOLD_OUT_EVERY // 2)]


def test_a_short_text_holds_nothing_out() -> None:
    text = (tiny_models.TEST_DATA / "calib.txt").read_text()[:HOLD_OUT_CHARS * 3]
    split = hold_out(text)
    assert split.calibration == text and split.probes == ""
