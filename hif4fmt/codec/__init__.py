"""The HiF4 codec internals: format facts, encoders, packing, a bit-pattern fast path, a numpy reference.

Layers (each may import only those before it): format -> encoders, packing -> swar (the fast path of
the toolkit encoder and of the decoder, same bits) -> ``hif4fmt.hifloat4`` (public API).
``reference`` is a torch-free, spec-literal implementation used to check the fast paths and to
generate the golden vectors.
"""
