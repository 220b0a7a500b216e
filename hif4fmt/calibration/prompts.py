"""Read calibration prompts from a JSON file and fingerprint the set actually used.

Why this module exists: the prompt set is part of the calibration protocol, so it must be read the same
way everywhere, refused clearly when malformed, and identified by a digest that does not change with
the file's formatting. Accepted layouts (spec 2.1):

  * a list of records holding the prompt under ``cap`` (OpenS2V-5M style): ``[{"cap": "..."}, ...]``;
    ``cap`` may also be a list of strings, of which the first non-empty one is used;
  * an object mapping record ids to such records (file order is kept);
  * a plain list of strings.

The first ``count`` prompts in file order are used. The digest is the SHA-256 of the canonical JSON of
that list of strings (UTF-8, no spaces, no ASCII escaping), so reformatting the file keeps it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hif4fmt.errors import CalibrationError
from hif4fmt.jsonfile import load_json_file

PROMPT_KEY = "cap"  # OpenS2V-5M caption field
MAX_PROMPT_FILE_BYTES = 256 * 1024 * 1024  # OpenS2V-5M shards are large; read at most 256 MiB
MAX_PROMPT_CHARS = 16_384


@dataclass(frozen=True)
class PromptSet:
    """The prompts used, in order, their canonical SHA-256 (hex) and the file name they came from."""

    prompts: tuple[str, ...]
    sha256: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        """Return header["prompts"] (spec 5.2.1): count, sha256 and source file name (no folder)."""
        return {"count": len(self.prompts), "sha256": self.sha256, "source": self.source}


def prompt_set_digest(prompts: list[str] | tuple[str, ...]) -> str:
    """Return the hex SHA-256 of the canonical JSON of ``prompts`` (spec 2.1)."""
    canonical = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def first_unencodable(text: str) -> int | None:
    """Return the index of the first character of ``text`` UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _prompt_of(record: Any, where: str) -> str:
    """Return the prompt text of one record (a string, or a map with ``cap``)."""
    if isinstance(record, str):
        text = record
    elif isinstance(record, dict) and PROMPT_KEY in record:
        value = record[PROMPT_KEY]
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if not isinstance(value, str):
            raise CalibrationError(f"{where}: '{PROMPT_KEY}' must be a string or a list of strings, "
                                   f"found {type(record[PROMPT_KEY]).__name__}")
        text = value
    else:
        found = f"keys {sorted(record)[:5]}" if isinstance(record, dict) else type(record).__name__
        raise CalibrationError(f"{where}: expected a string or an object with '{PROMPT_KEY}', found {found}")
    text = text.strip()
    if not text:
        raise CalibrationError(f"{where}: empty prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise CalibrationError(f"{where}: prompt of {len(text)} characters exceeds {MAX_PROMPT_CHARS}")
    bad = first_unencodable(text)
    if bad is not None:
        raise CalibrationError(f"{where}: character {bad} is a lone surrogate (U+{ord(text[bad]):04X}), which is not "
                               f"text; fix the escape (e.g. \\ud83d\\ude00 must come as a pair) or drop it")
    return text


def load_prompts(path: str | Path, count: int) -> PromptSet:
    """Return the first ``count`` prompts of the JSON file ``path`` (layouts in the module docstring).

    Raises ``CalibrationError`` naming the file and record for an unreadable file, a bad record or a
    file with fewer than ``count`` prompts.
    """
    path = Path(path)
    if count < 1:
        raise CalibrationError(f"--num-prompts {count}: expected at least 1")
    document = load_json_file(path, "the prompts file", MAX_PROMPT_FILE_BYTES, CalibrationError)
    if isinstance(document, dict):
        records = list(document.items())
    elif isinstance(document, list):
        records = [(str(index), record) for index, record in enumerate(document)]
    else:
        raise CalibrationError(f"{path}: expected a JSON list of records (or of strings) or an object of "
                               f"records, found {type(document).__name__}")
    if len(records) < count:
        raise CalibrationError(f"{path}: holds {len(records)} prompts but {count} were asked for; pass "
                               f"--num-prompts {len(records)} or a larger prompts file")
    prompts = tuple(_prompt_of(record, f"{path}: record {key}") for key, record in records[:count])
    return PromptSet(prompts, prompt_set_digest(prompts), path.name)
