import pytest
import torch

from mvreg_ros.core.data.deepfluoro import read_structures
from mvreg_ros.core.evaluation.landmarks import (
    MAX_STRUCTURES,
    Landmarks,
    bone_octants,
    ct_landmarks,
    file_landmarks,
    structure_centroids,
)
from mvreg_ros.core.imaging.volume import Volume, example_ct_path

F64 = torch.float64


def _affine():
    A = torch.eye(4, dtype=F64)
    A[:3, :3] = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=F64))
    A[:3, 3] = torch.tensor([-10.0, 5.0, 100.0], dtype=F64)
    return A


def _mask_with(sizes: dict[int, int]) -> torch.Tensor:
    """Label l fills the first sizes[l] voxels of row l (k = l, j = 0, i = 0..n-1)."""
    mask = torch.zeros(12, 4, 20, dtype=torch.int16)
    for label, n in sizes.items():
        mask[label, 0, :n] = label
    return mask


def test_structure_centroids_are_analytic_largest_first_and_named():
    A = _affine()
    mask = _mask_with({1: 6, 2: 10, 3: 5, 4: 8, 5: 4})  # label 5 is below MIN_VOXELS
    lm = structure_centroids(mask, A, {2: "two", 4: "four"})
    assert lm.policy == "structure-centroids" and lm.names == ("two", "four", "label-1", "label-3")
    # centroid of label l: (i, j, k) = ((n - 1) / 2, 0, l)
    ijk = torch.tensor([[4.5, 0, 2], [3.5, 0, 4], [2.5, 0, 1], [2.0, 0, 3]], dtype=F64)
    torch.testing.assert_close(lm.points_ct, ijk @ A[:3, :3].T + A[:3, 3])
    assert lm.describe() == {"policy": "structure-centroids", "count": 4}
    # at most max_structures, ties broken by label: deterministic
    two = structure_centroids(_mask_with({1: 6, 2: 6, 3: 6, 4: 6}), A, max_structures=2)
    assert two.names == ("label-1", "label-2")


def test_too_few_structures_fall_back_to_the_bone_octants():
    A = _affine()
    mask = _mask_with({1: 6, 2: 10, 3: 5})
    assert structure_centroids(mask, A) is None
    data = torch.zeros(12, 4, 20)
    data[0, 0, 0] = data[11, 3, 19] = 1.0  # bone at two opposite corners: two octants
    lm = ct_landmarks(Volume(data=data, T_ct_from_index=A, mask=mask))
    assert lm.policy == "bone-octants" and lm.names == ("bone-octant-0", "bone-octant-7")
    ijk = torch.tensor([[0.0, 0, 0], [19, 3, 11]], dtype=F64)
    torch.testing.assert_close(lm.points_ct, ijk @ A[:3, :3].T + A[:3, 3])
    assert bone_octants(Volume(data=data, T_ct_from_index=A)).names == lm.names  # no mask at all
    with pytest.raises(ValueError, match="no bone"):
        ct_landmarks(Volume(data=torch.zeros(3, 3, 3), T_ct_from_index=A))


def test_the_shipped_ct_is_scored_at_anatomical_structures(tiny_ct):
    names = read_structures(example_ct_path().with_name("structures.csv"))
    lm = ct_landmarks(tiny_ct, names)
    assert lm.policy == "structure-centroids" and 8 <= len(lm) <= MAX_STRUCTURES
    p = dict(zip(lm.names, lm.points_ct))
    assert {"sternum", "scapula_left", "scapula_right"} <= set(p)
    spine = [p[n] for n in p if n.startswith("vertebrae_")]
    assert spine, lm.names
    # LPS: the sternum lies anterior (smaller P) to the spine; left structures have larger L
    assert all(p["sternum"][1] < v[1] - 30 for v in spine)
    assert p["scapula_left"][0] > p["scapula_right"][0] + 100
    lo, hi = tiny_ct.corners_ct().amin(0), tiny_ct.corners_ct().amax(0)
    assert bool(((lm.points_ct >= lo) & (lm.points_ct <= hi)).all())
    again = ct_landmarks(tiny_ct, names)
    assert again.names == lm.names and torch.equal(again.points_ct, lm.points_ct)


def test_file_landmarks_are_kept_and_checked():
    lm = file_landmarks(["a", "b"], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert lm.policy == "file" and lm.points_ct.dtype == F64 and len(lm) == 2
    with pytest.raises(ValueError, match="2 landmark names for 1 points"):
        Landmarks(("a", "b"), torch.zeros(1, 3, dtype=F64), "file")
    with pytest.raises(ValueError, match="policy"):
        Landmarks(("a",), torch.zeros(1, 3, dtype=F64), "random")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        Landmarks((), torch.zeros(0, 3, dtype=F64), "file")
