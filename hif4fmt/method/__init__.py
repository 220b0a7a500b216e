"""Recipe methods that go past one global recipe: the per-layer recipe search and the block ranking.

Why this sub-package exists: ``hif4fmt.build`` applies a recipe; the modules here decide it from data.
``search`` picks, per quantized layer, the percentile, alpha and optional rotation that minimise the
layer's output error on held-out calibration rows (statistics file only, no model run); ``rank``
runs the base model on calibration inputs and orders whole blocks by how much keeping each one in
BF16 lowers the error of the transformer output (``build --retain-block auto``).
"""
