"""Per-tensor quantization sensitivity: the predicted KL divergence each tensor adds at each type.

cost         the Sensitivity costs, which tensors are quantized, candidate types, active elements
defaults     costs from shapes alone (reference-model tables)
quant_error  measured importance-weighted quantization error per tensor and type (sampled rows)
fit          errors + probe KLs -> costs: power law, calibration, layer factors
cache        the result cached in the stats file (fingerprints, key, load, store)

The probes through llama.cpp that calibrate a measured sensitivity: :mod:`ggufmoe.pipeline.measure`.
"""
