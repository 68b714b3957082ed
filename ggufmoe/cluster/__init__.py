"""The commands on a Ray cluster (``--ray``): conversions' pieces quantized on the workers, calibration tokens split
across them, a sweep's points as tasks. Ray is optional (``pip install 'ggufmoe[ray]'``)."""
