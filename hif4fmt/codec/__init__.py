"""The HiF4 codec internals: format facts, encoders, packing, a numpy reference.

Layers (each may import only those before it): format -> encoders, packing -> ``hif4fmt.hifloat4``
(public API). ``reference`` is a torch-free, spec-literal implementation used to check the fast path
and to generate the golden vectors.
"""
