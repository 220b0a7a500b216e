"""Test helper: rewrite a calibration statistics file with its JSON header and/or tensors edited."""

from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hif4fmt.calibration.constants import STATS_METADATA_KEY


def rewrite_stats(source, target=None, edit_header=None, edit_tensors=None):
    """Re-save ``source`` (to ``target``, default in place) as a well-formed safetensors file, edited."""
    with safe_open(str(source), framework="pt") as handle:
        header = json.loads(handle.metadata()[STATS_METADATA_KEY])
    tensors = load_file(str(source))
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(target or source), metadata={STATS_METADATA_KEY: json.dumps(header)})
