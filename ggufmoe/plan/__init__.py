"""The memory-budget plan: which experts to keep and one type per tensor.

budget    Budget and Plan (the plan JSON: save, load, its pruning and type rules)
allocate  the search: options per tensor (convex hull), greedy allocation, keep counts, pruning cost
layout    what the output file holds but tensor data: metadata, tensor infos, their exact bytes
memory    llama.cpp's runtime memory (weights, KV cache, compute buffers)
target    the machine a plan is for (--target): CPU repacks, GPU offload
report    the plan as text, notes on a GGUF source's types

Making a plan from a model (statistics, sensitivities, pruning cost): :mod:`ggufmoe.pipeline.planning`.
"""
