"""Running llama.cpp: log-probabilities, evaluation, validation under a memory limit, its own quantizer."""
