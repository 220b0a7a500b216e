"""Bounded, seeded fuzzing of the reader: random corruption yields only StateFormatError (or its subclasses), never
another exception, a crash or a hang."""

from __future__ import annotations

import copy
import random
import time

import pytest

from hif4fmt.errors import StateFormatError
from hif4fmt.state import encode_state, read_state_bytes
from state_support import assemble, mutate_header, split_file, tiny_state

BYTE_CASES = 20000
STRUCTURED_CASES = 4000
TIME_BUDGET_S = 10.0  # stop early rather than slow the suite down on a busy machine


@pytest.fixture(scope="module")
def good() -> bytes:
    return encode_state(tiny_state(layers=3, in_features=72))


def test_random_byte_flips_and_truncations_raise_only_typed_errors(good):
    rng = random.Random(20240611)
    deadline = time.monotonic() + TIME_BUDGET_S
    accepted = 0
    for case in range(BYTE_CASES):
        if time.monotonic() > deadline:
            break
        data = bytearray(good)
        kind = rng.random()
        if kind < 0.6:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind < 0.8:
            data = data[: rng.randrange(len(data))]
        else:
            position = rng.randrange(len(data))
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        if bytes(data) == good:
            continue
        try:
            read_state_bytes(bytes(data))
            accepted += 1
        except StateFormatError:
            pass
    # every byte is covered by a checksum, a zero-padding rule or a structural check (spec 3.4)
    assert accepted == 0


def test_structured_header_mutations_with_valid_checksums_raise_only_typed_errors(good):
    _, _, header, section = split_file(good)
    rng = random.Random(99)
    deadline = time.monotonic() + TIME_BUDGET_S
    outcomes = {"error": 0, "read": 0}
    for _ in range(STRUCTURED_CASES):
        if time.monotonic() > deadline:
            break
        mutated = copy.deepcopy(header)
        for _ in range(rng.randint(1, 3)):
            mutate_header(mutated, rng)
        data = assemble(mutated, section)
        try:
            read_state_bytes(data)
            outcomes["read"] += 1  # e.g. an unknown key added: allowed by the compatibility rules
        except StateFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > outcomes["read"]
