"""Read a small JSON file (a config, an index, a prompt set) with a size bound and one typed error.

Why this module exists: several inputs the tools take from users are JSON (``model_index.json``,
safetensors index files, transformer ``config.json``, calibration prompt files). Each must be bounded
in size before it is read, refuse duplicate keys (two readers could otherwise disagree on the value),
and turn every failure (missing file, bad UTF-8, bad JSON, nesting too deep) into the caller's typed
error naming the file. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hif4fmt.errors import Hif4Error


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that refuses a key given twice in one object."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def load_json_file(path: Path, what: str, max_bytes: int, error: type[Hif4Error]) -> Any:
    """Return the parsed JSON of ``path``; raise ``error`` naming ``path`` and ``what`` on any failure.

    Files larger than ``max_bytes`` are refused before reading; duplicate keys are refused.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {what} is {size} bytes; at most {max_bytes} are accepted")
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except Hif4Error:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from None
