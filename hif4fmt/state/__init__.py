"""The .hif4 compact PTQ state: records, reader and writer (torch-free). Spec: spec/state-v1.md.

Why this package exists: a state (masks + descriptors, bound by hash to one base checkpoint) is written
by ``hif4fmt build`` and read by ``inspect``, ``diff``, ``verify``, ``card`` and the runtime. The records
(``model``), the byte rules (``canonical``, ``masks``, ``rules``), the ``writer`` and the ``reader`` are
separate modules; reader and writer never import each other. Import the public API from here::

    from hif4fmt.state import State, QuantizedLayer, ExcludedLayer, BaseBinding, write_state, read_state
"""

from hif4fmt.state.model import (
    BaseBinding,
    ExcludedLayer,
    LayerRecipe,
    MaskRecord,
    MaskStats,
    QuantizedLayer,
    State,
    StateLayout,
    TensorDigest,
    default_producer,
)
from hif4fmt.constants import ROTATION_HADAMARD64, ROTATIONS
from hif4fmt.state.reader import read_state, read_state_bytes
from hif4fmt.state.rules import mask_tensor_name, quantization_descriptor
from hif4fmt.state.writer import encode_state, write_state

__all__ = [
    "BaseBinding", "ExcludedLayer", "LayerRecipe", "MaskRecord", "ROTATIONS", "ROTATION_HADAMARD64", "TensorDigest", "MaskStats", "QuantizedLayer", "State", "StateLayout",
    "default_producer", "encode_state", "mask_tensor_name", "quantization_descriptor", "read_state",
    "read_state_bytes", "write_state",
]
