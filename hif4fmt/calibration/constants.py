"""Every constant of the calibration statistics file and of its per-channel sketch, declared once.

Why this module exists: the sketch, the collector, the stats writer and reader, the distributed merge,
the build and spec/stats-v1.md must agree on these numbers. Nothing else in ``hif4fmt.calibration``
writes a bare bit mask, shift or file-format string. Section numbers refer to spec/stats-v1.md.
"""

from __future__ import annotations

# --- float32 bit layout the sketch buckets on (spec 3.1) --------------------------------------------

FLOAT32_MANTISSA_BITS = 23  # stored fraction bits of an IEEE-754 binary32
FLOAT32_EXPONENT_BIAS = 127  # biased exponent 127 = 2**0
FLOAT32_ABS_MASK = 0x7FFF_FFFF  # clears the sign bit: |x| as raw bits
FLOAT32_INF_BITS = 0x7F80_0000  # +inf; every NaN has larger bits once the sign is cleared
FLOAT32_MIN_NORMAL_EXPONENT = -126  # smallest unbiased exponent of a normal float32
FLOAT32_MAX_EXPONENT = 128  # 2**128 is the first value past the finite range (= inf)

# --- the sketch grid (spec 3.1) -------------------------------------------------------------------

DEFAULT_MANTISSA_BITS = 3  # bins per octave = 2**3 = 8: relative bin width <= 1/8
DEFAULT_EXPONENT_MIN = -16  # |x| < 2**-16 (1.5e-5) goes to the underflow bin (zero included)
DEFAULT_EXPONENT_MAX = 16  # |x| >= 2**16 (65536), inf and NaN go to the overflow bin
MAX_MANTISSA_BITS = 10  # 1024 bins per octave; more only costs memory (BF16 activations carry 7 bits)
UNDERFLOW_BINS = 1  # bin 0: [0, 2**exponent_min)
OVERFLOW_BINS = 1  # last bin: [2**exponent_max, inf], NaN counted here too
COUNT_DTYPE = "int64"  # bin counts: merged by exact integer addition
SKETCH_KIND = "float32-exponent-mantissa-histogram"  # header["sketch"]["kind"]
RANK_RULE = "linear"  # torch.quantile / numpy 'linear': x[j] + (h - j) * (x[j+1] - x[j]), h = q * (N - 1)
MAX_BINCOUNT_ELEMENTS = 1 << 24  # activations bucketed per chunk: bounds temporaries to ~16 M x 8 bytes

# --- held-out activation rows (spec 4) -------------------------------------------------------------

DEFAULT_HOLDOUT_ROWS = 64  # token rows kept per layer for the fidelity report
MAX_HOLDOUT_ROWS = 4096
RECORD_ID_BITS = 19  # row id = record << 44 | call << 24 | token  (63 bits, sign bit clear)
CALL_ID_BITS = 20  # forward calls of one layer within one record (steps x CFG branches)
TOKEN_ID_BITS = 24  # rows of one activation tensor (batch x tokens)
HOLDOUT_SELECTION = "splitmix64 bottom-k of row id (record << 44 | call << 24 | token)"
SPLITMIX64_GAMMA = 0x9E37_79B9_7F4A_7C15  # splitmix64 increment (golden ratio * 2**64)
SPLITMIX64_MUL1 = 0xBF58_476D_1CE4_E5B9  # splitmix64 finaliser multipliers (Stafford's Mix13)
SPLITMIX64_MUL2 = 0x94D0_49BB_1331_11EB
SPLITMIX64_SHIFTS = (30, 27, 31)
HOLDOUT_DTYPES = ("bfloat16", "float16", "float32")  # activation dtypes the file stores as seen

# --- the statistics file (spec 5) -----------------------------------------------------------------

STATS_FORMAT_NAME = "hif4fmt-stats"  # header["format"]
STATS_MAJOR = 1  # readers refuse other majors
STATS_MINOR = 0  # additive header keys only
STATS_METADATA_KEY = "hif4fmt.stats"  # safetensors __metadata__ key whose value is the JSON header
STATS_FILE_SUFFIX = ".safetensors"
MAX_STATS_HEADER_BYTES = 16 * 1024 * 1024  # JSON header: ~240 bytes per layer, 800 layers ~ 190 KB
MAX_STATS_LAYERS = 100_000
MAX_CHANNELS = 1 << 24  # in_features of one layer
# per-layer tensors: "<component>/<module>.<field>"; field -> (dtype, shape description)
LAYER_FIELDS = {
    "counts": "int64 (in_features, stored_bins): bins [bin_offset, bin_offset + stored_bins) of the grid",
    "absmax": "float32 (in_features,): exact max |x| per input channel (inf if any non-finite)",
    "absmin": "float32 (in_features,): exact min |x| per input channel",
    "nonfinite": "int64 (in_features,): count of inf/NaN activations per input channel",
    "holdout": "activation dtype (rows, in_features): held-out input rows",
    "holdout_ids": "int64 (rows,): row ids, in ascending splitmix64 key order",
}
TENSOR_NAME = "{component}/{module}.{field}"
