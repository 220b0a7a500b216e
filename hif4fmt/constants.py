"""Every constant of the .hif4 state format and of the base fingerprint, declared once.

Why this module exists: the reader, the writer, the fingerprint, the CLI and the spec generator must
agree byte for byte, so the magic, the versions, the byte layout of the preamble, the alignment, the
limits every parser enforces and the algorithm ids live here, each with its literal meaning. Nothing
else in the package writes a bare 64 or a bare b"HIF4". Section numbers refer to spec/state-v1.md.
Torch-free (imports only the codec's format facts, which are torch-free too).
"""

from __future__ import annotations

import struct

from hif4fmt.codec.format import HIF4, HIFLOAT4_SPEC_VERSION

# --- container: preamble (spec 3.1) -----------------------------------------------------------------

STATE_MAGIC = b"\x89HIF4\r\n\x1a"  # 8 bytes: 0x89 (not 7-bit ASCII), "HIF4", CR LF, 0x1A (DOS EOF)
STATE_MAJOR = 1  # u16 at byte 8: incompatible layout changes bump it; readers refuse other majors
STATE_MINOR = 1  # u16 at byte 10: the newest minor this writer knows; readers accept any minor of their major
STATE_MINOR_1_0 = 0  # written when a state uses none of the 1.1 keys below (spec 8)
# 1.1 (spec 4.6, 4.7): layer "recipe" and "rotation", base "layout" and "tensors"
SUPPORTED_MAJORS = (1,)  # majors this reader implements
STATE_FORMAT_NAME = "hif4-state"  # header["format"]
STATE_FILE_SUFFIX = ".hif4"  # conventional file name suffix (not checked by the reader)

# magic 8s | major u16 | minor u16 | header length u64 | header sha256 32s | reserved 12s, little-endian
PREAMBLE_STRUCT = struct.Struct("<8sHHQ32s12s")
PREAMBLE_BYTES = PREAMBLE_STRUCT.size  # 64 = 8 + 2 + 2 + 8 + 32 + 12
CHECKSUMMED_PREAMBLE_BYTES = 8 + 2 + 2 + 8  # 20: magic, major, minor, header length are hashed too
HEADER_SHA256_OFFSET = 8 + 2 + 2 + 8  # 20: where the 32-byte header checksum sits
RESERVED_OFFSET = HEADER_SHA256_OFFSET + 32  # 52: 12 reserved bytes, MUST be zero
RESERVED_BYTES = PREAMBLE_BYTES - RESERVED_OFFSET  # 12
HEADER_OFFSET = PREAMBLE_BYTES  # 64: the msgpack header starts right after the preamble
ALIGNMENT = 64  # data section start and every tensor offset are multiples of 64 bytes (spec 3.3)
PADDING_BYTE = b"\x00"  # every padding byte MUST be zero

# --- limits every reader enforces before it reads (spec 11) -----------------------------------------

MAX_HEADER_BYTES = 64 * 1024 * 1024  # 64 MiB of msgpack header
MAX_TENSORS = 1_000_000  # entries of header["tensors"]
MAX_LAYERS = 1_000_000  # quantized + excluded layers across all components
MAX_COMPONENTS = 64  # entries of header["components"] and base.components
MAX_NAME_BYTES = 1024  # UTF-8 bytes of a component or module name (and of a hub hint key)
MAX_TENSOR_NAME_BYTES = 4096  # bytes of a tensor name; "<component>/<module>.mask" needs at most 2 * 1024 + 6
MAX_RETAINED_BLOCK_INDEX = 999_999_999  # "COMPONENT:INDEX" with at most 9 decimal digits (fits any int32)
MAX_STRING_BYTES = 64 * 1024  # UTF-8 bytes of any other string in the header
MAX_CONTAINER_ENTRIES = 1_000_000  # entries of any one msgpack map or array
MAX_NESTING_DEPTH = 32  # maps/arrays nested inside each other, the header map counting as 1
MAX_HEADER_CONTAINERS = 1_000_000  # maps + arrays in the whole header (an empty map is 1 byte, ~64 in RAM)
MAX_HEADER_VALUES = 4_000_000  # map keys + map values + array entries in the whole header
MAX_FEATURES = 1 << 24  # in_features / out_features of one layer (16,777,216)
MAX_FREE_MAP_BYTES = 1024 * 1024  # msgpack bytes of each free-form map (calibration, producer, extra)
MAX_INT = (1 << 63) - 1  # largest integer allowed anywhere in the header (int64)
MIN_INT = -(1 << 63)

# --- header descriptors (spec 4.3) -----------------------------------------------------------------

QUANT_FORMAT = "hifloat4"  # weight and activation element format
QUANT_UNIT = HIF4.unit  # 64 elements share one scale word, along the quantized axis
QUANT_AXIS = -1  # quantized along the last axis = in_features of the linear
QUANT_AXIS_NAME = "in_features"
CODEC_SPEC_VERSION = f"hifloat4-spec {HIFLOAT4_SPEC_VERSION}"  # "hifloat4-spec 1.0"
MASK_AXIS_NAME = "in_features"  # one mask value per input channel
MASK_APPLICATION = "y = HiF4(x * m) @ HiF4(W / m).T + b"  # how a runtime applies the mask
# quantization.mask.application of a state with at least one rotated layer (1.1); a 1.0 reader refuses it
MASK_APPLICATION_ROTATED = "y = HiF4(R(x * m)) @ HiF4(R(W / m)).T + b, R = the layer's rotation or the identity"
ROTATION_HADAMARD64 = "hadamard-64"  # R = blockdiag(H64 / 8) per 64-element unit along in_features
ROTATIONS = (ROTATION_HADAMARD64,)  # values of a layer's "rotation" key (absent = identity)
LAYER_STATISTICS = ("percentile", "max")  # values of a layer recipe's "statistic"
MAX_BASE_TENSORS = 1_000_000  # entries of base.tensors over all components
MAX_TENSOR_DIMS = 16  # dimensions of one base tensor's recorded shape
SAFETENSORS_DTYPE_PATTERN = r"[A-Z0-9_]{1,16}"  # a base tensor's recorded dtype, as safetensors spells it

# on-disk mask dtypes (Recipe.mask_dtype) -> (numpy little-endian storage dtype, bytes per value)
MASK_DTYPES = {
    "float32": ("<f4", 4),
    "float16": ("<f2", 2),
    "bfloat16": ("<u2", 2),  # stored as the high 16 bits of float32, round to nearest even
}
MASK_TENSOR_SUFFIX = ".mask"  # tensor name = "<component>/<module>.mask"
COMPONENT_SEPARATOR = "/"
CHECKSUM_ALGORITHM = "sha256"  # per-tensor and header checksums
SHA256_HEX_CHARS = 64

# --- base checkpoint fingerprint (spec 6) ----------------------------------------------------------

FINGERPRINT_ALGORITHM = "hif4fmt-sha256-tensors-v1"
FINGERPRINT_ALGORITHMS = (FINGERPRINT_ALGORITHM,)  # ids verify knows how to recompute
U64 = struct.Struct("<Q")  # length prefixes in the fingerprint byte streams
HASH_CHUNK_BYTES = 16 * 1024 * 1024  # sha256 is fed 16 MiB slices of the mmap
HASH_MAX_THREADS = 8  # hashlib releases the GIL; hash this many tensors at once at most
HASH_BATCH_BYTES = 64 * 1024 * 1024  # one thread-pool task hashes consecutive tensors up to this many bytes...
HASH_BATCH_TENSORS = 1024  # ...or this many tensors, so tiny tensors do not cost one task each

# --- safetensors (reference: huggingface/safetensors README "Format") -----------------------------

SAFETENSORS_LENGTH_BYTES = 8  # u64 little-endian JSON header length
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
SAFETENSORS_MAX_TENSORS = 100_000  # tensors in one file (a Wan2.2 A14B expert has 1,095; refused above this)
SAFETENSORS_METADATA_KEY = "__metadata__"
# dtype string -> bits per element (sub-byte types pack; a tensor's bytes = ceil(numel * bits / 8))
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# dtypes read_tensor_numpy can convert (little-endian numpy view; BF16 is widened by bit shift)
SAFETENSORS_NUMPY_DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "BF16": "<u2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}

# --- diffusers folder layout -----------------------------------------------------------------------

MODEL_INDEX_NAME = "model_index.json"
COMPONENT_CONFIG_NAME = "config.json"  # a transformer folder's diffusers config: what makes it a component
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 64 * 1024 * 1024  # a *.index.json or model_index.json larger than this is refused
