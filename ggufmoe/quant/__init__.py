"""Quantization: llama.cpp's quantizers through ctypes, and which type each tensor gets."""
