"""The 64-point Hadamard rotation (hif4fmt/codec/rotation.py): the matrix, and both copies giving one set of bits."""

from __future__ import annotations

import numpy as np
import torch

from hif4fmt.codec.rotation import hadamard_matrix, rotate_numpy, rotate_torch


def test_rotation_is_x_times_blockdiag_h64_over_8():
    x = np.random.default_rng(0).standard_normal((5, 128))
    r = hadamard_matrix() / 8
    assert np.allclose(r @ r.T, np.eye(64))
    expected = (x.reshape(5, 2, 64) @ r).reshape(5, 128)
    assert np.abs(rotate_numpy(x) - expected).max() < 1e-12
    assert np.abs(rotate_numpy(rotate_numpy(x)) - x).max() < 1e-12  # symmetric and orthonormal


def test_torch_and_numpy_rotations_give_the_same_float32_bits():
    x = (np.random.default_rng(1).standard_normal((7, 3, 192)) * 100).astype(np.float32)
    torch_bits = rotate_torch(torch.from_numpy(x)).numpy().view(np.uint32)
    assert np.array_equal(torch_bits, rotate_numpy(x).view(np.uint32))
