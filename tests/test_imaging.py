"""The image helpers shared by analysis, training and the augmentation (glomscan/imaging.py)."""

import numpy as np


def test_dihedral_is_the_eight_symmetries_of_a_square_for_arrays_and_tensors():
    """The one flip/rotation helper every trainer uses: numpy's rot90 then a mirror along the
    plane's second axis; a torch tensor gets the same pixels."""
    import torch

    from glomscan.imaging import dihedral

    a = np.arange(3 * 4 * 2).reshape(3, 4, 2)
    seen = set()
    for k in range(4):
        for flip in (False, True):
            expected = np.rot90(a, k)[:, ::-1] if flip else np.rot90(a, k)
            assert np.array_equal(dihedral(a, k, flip), expected)
            tensor = dihedral(torch.from_numpy(a.copy()).permute(2, 0, 1), k, flip, dims=(1, 2))
            assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected)
            seen.add(dihedral(np.arange(9).reshape(3, 3), k, flip).tobytes())
    assert len(seen) == 8


def test_stain_ratio_moves_one_mean_stain_to_another_within_its_limits():
    """The optical-density stain transfer of the composites and the outline crops."""
    from glomscan.imaging import from_optical_density, optical_density, stain_ratio

    source = np.array([0.20, 0.40, 0.10], np.float32)
    target = np.array([0.30, 0.30, 0.15], np.float32)
    np.testing.assert_allclose(source * stain_ratio(source, target), target, rtol=1e-2)
    assert np.array_equal(stain_ratio(np.array([0.1]), np.array([0.9])), [2.0])  # clipped
    assert np.array_equal(stain_ratio(np.array([0.9]), np.array([0.1])), [0.5])
    pink = np.full((2, 2, 3), (230, 150, 200), np.uint8)
    assert np.allclose(from_optical_density(optical_density(pink)), pink, atol=1e-3)
