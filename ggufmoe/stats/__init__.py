"""Calibration statistics: importance matrices, routing statistics, the stats file, text to tokens."""
