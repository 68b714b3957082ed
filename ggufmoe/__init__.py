"""ggufmoe: fit Mixture-of-Experts models into a memory budget as one drop-in GGUF for llama.cpp."""
