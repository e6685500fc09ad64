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
