"""Every exception hif4fmt raises on purpose, in one place.

Why this module exists: callers (the CLI, the runtime, other tools) catch these by type and map them
to one-line messages and exit codes; nothing else in the package defines an exception class.
Each message names the file, the layer or byte offset, what was expected, what was found and,
when there is one, the fix.

Exit codes used by the CLI (see ``hif4fmt.cli``): 0 ok, 1 differs / mismatch, 2 bad input.
"""

from __future__ import annotations


class Hif4Error(Exception):
    """Base class of every error hif4fmt raises on purpose. CLI exit code 2 unless stated."""

    exit_code = 2


# --- codec -----------------------------------------------------------------------------------------


class CodecError(Hif4Error):
    """Invalid input to the HiF4 codec (dtype, shape, encoder name, malformed packed data)."""


class UnknownEncoderError(CodecError):
    """An encoder name that is not registered (see ``hif4fmt.codec.ENCODERS``)."""


class NonFiniteInputError(CodecError):
    """NaN in a tensor that is to be packed: packed HiF4 has no NaN code."""


# --- the .hif4 state file ----------------------------------------------------------------------------


class StateFormatError(Hif4Error):
    """A .hif4 file that is not valid: bad magic, bounds, checksum, schema or value."""


class UnsupportedVersionError(StateFormatError):
    """A .hif4 file whose major version this reader does not implement."""


class ChecksumError(StateFormatError):
    """A header or tensor checksum in a .hif4 file does not match its bytes."""


class StateWriteError(Hif4Error):
    """A state could not be written (invalid content, or an I/O failure; no partial file is left)."""


class RecipeError(Hif4Error):
    """An invalid calibration/quantization recipe (percentile, alpha, eps, retained blocks, encoder)."""


# --- base checkpoint ---------------------------------------------------------------------------------


class BaseCheckpointError(Hif4Error):
    """A base checkpoint folder that cannot be read (missing files, bad safetensors, bad index)."""


class BaseMismatchError(Hif4Error):
    """A state is bound to a different base checkpoint than the one given. Exit code 1."""

    exit_code = 1


# --- calibration and build -----------------------------------------------------------------------------


class StatsFormatError(Hif4Error):
    """A calibration statistics file that is corrupt, incomplete or made for other layers."""


class CalibrationError(Hif4Error):
    """Calibration could not run (bad prompt file, bad protocol options, model mismatch)."""


class BuildError(Hif4Error):
    """A state could not be built from a base and statistics (layer missing, shape mismatch...)."""


# --- runtime -----------------------------------------------------------------------------------------


class RuntimeLoadError(Hif4Error):
    """The W4A4 model could not be rebuilt from a base checkpoint and a state."""


class VideoWriteError(Hif4Error):
    """Frames that cannot be written as a video file (shape, dtype, odd size for H.264) or an encoder failure."""


# --- outputs and installs ------------------------------------------------------------------------------


class OutputPathError(Hif4Error):
    """An output path refused before any work: it is an input or inside the base folder, two outputs are
    the same file, its folder is missing or not writable, it is a folder, or it exists without --force."""


class OutputWriteError(Hif4Error):
    """A set of output files could not be written; the message says which files were and were not written."""


class MissingExtraError(Hif4Error):
    """A command needs an optional dependency group (``pip install "hif4fmt[runtime]"``) that is not installed."""
# --- LoRAs merged at load (wan_runtime.lora) -------------------------------------------------------------


class LoraError(Hif4Error):
    """A LoRA that cannot be merged into an expert (the message names the file and, where there is one, the key)."""


class LoraFormatError(LoraError):
    """A LoRA file that is missing, not a safetensors file, or holds NaN/inf or unreadable metadata."""


class LoraKeyError(LoraError):
    """A LoRA key that names no layer of the expert it is merged into (or no LoRA tensor at all)."""


class LoraShapeError(LoraError):
    """A LoRA tensor whose shape does not fit the layer it names."""


class LoraModelMismatchError(LoraShapeError):
    """A LoRA made for another model size (other block count or inner dimension) than the expert."""


class LoraScaleError(LoraError):
    """A LoRA scale that is not a finite number (``PATH:SCALE``, or the scale of a ``(path, scale)`` pair)."""
