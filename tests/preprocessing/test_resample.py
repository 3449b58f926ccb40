"""Resampling: masks stay binary and aligned (Dice with the resampled ground truth), one grid per case."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes
from client.preprocessing.resample import Resample, resample_image, resample_onto, target_grid
from common.imageio import geometry_mismatches
from tests.preprocessing.phantom_cases import case, dice, image, phantom


def _centroid_mm(mask: sitk.Image) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]
    return np.mean([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in idx], axis=0)


def _ellipsoid_on(grid: sitk.Image, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """The analytic ellipsoid sampled at the voxel centres of ``grid`` (z, y, x array)."""
    size = grid.GetSize()
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), axis=-1).reshape(-1, 3)
    points = np.asarray(grid.GetOrigin()) + zyx[:, ::-1] * np.asarray(grid.GetSpacing())
    return ((((points - centre) / axes) ** 2).sum(axis=1) <= 1.0).reshape(size[::-1])


def test_resampled_mask_matches_the_analytic_truth_on_the_new_grid() -> None:
    """A tumour of known shape (ellipsoid, 12 x 10 x 11 mm semi-axes, off the grid's centre) at each scanner's
    spacing, resampled to another spacing: Dice with the same ellipsoid sampled on the new grid >= 0.95."""
    centre, axes = np.array([2.3, -1.7, 0.9]), np.array([12.0, 10.0, 11.0])
    for src_spacing, dst_spacing in (((1.2, 1.2, 1.5), (1.0, 1.0, 1.0)), ((1.0, 1.0, 1.0), (1.3, 1.3, 1.6)),
                                     ((1.25, 1.25, 1.4), (0.9, 0.9, 1.1)), ((1.1, 1.1, 1.25), (1.5, 1.5, 1.5))):
        grid = sitk.Image([32, 32, 32], sitk.sitkUInt8)
        grid.SetSpacing(src_spacing)
        grid.SetOrigin(tuple(-15.5 * s for s in src_spacing))
        mask = sitk.GetImageFromArray(_ellipsoid_on(grid, centre, axes).astype(np.uint8))
        mask.CopyInformation(grid)
        ref = sitk.Cast(mask, sitk.sitkFloat32)
        out = Resample(dst_spacing)(CaseVolumes("p", {"T2w": ref}, mask, "T2w")).mask
        d = dice(sitk.GetArrayFromImage(out) > 0, _ellipsoid_on(out, centre, axes))
        assert d >= 0.95, (src_spacing, dst_spacing, d)
        assert set(np.unique(sitk.GetArrayViewFromImage(out)).tolist()) == {0, 1}


def test_resampled_phantom_masks_stay_binary_aligned_and_on_the_image_grid() -> None:
    for site, spacing in ((1, (1.0, 1.0, 1.0)), (0, (1.3, 1.3, 1.6)), (3, (0.9, 0.9, 1.1))):
        ph, _ = phantom(site, size=32)
        resampled = Resample(spacing)(case(ph))
        mask = resampled.mask
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) == {0, 1}
        # the simulator's tumour labels, resampled independently, give the same mask
        truth = image(ph, (ph.tissues == 4).astype(np.uint8))
        assert dice(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(resample_onto(truth, mask, "nearest"))) == 1.0
        # close to the partial-volume truth (linear fraction >= 1/2); these tumours are only 50-600 voxels, where
        # any nearest-neighbour mask loses to the discretisation (measured 0.88-0.94)
        fraction = sitk.GetArrayFromImage(resample_onto(sitk.Cast(truth, sitk.sitkFloat32), mask, "linear"))
        assert dice(sitk.GetArrayFromImage(mask) > 0, fraction >= 0.5) >= 0.85
        # aligned in space: same centroid (mm) within half a voxel
        shift = np.linalg.norm(_centroid_mm(mask) - _centroid_mm(image(ph, ph.mask)))
        assert shift < 0.5 * min(spacing), (site, shift)
        # every volume of the case on one grid, at the target spacing
        for seq in ("T2w", "CET1"):
            assert not geometry_mismatches(resampled.images[seq], mask)
        assert np.allclose(mask.GetSpacing(), spacing)


def test_target_grid_keeps_the_field_of_view_centred() -> None:
    ph, _ = phantom(1, size=32)
    src = image(ph, ph.images["T2w"])
    grid = target_grid(src, (1.0, 1.0, 1.0))
    assert grid.GetSize() == (38, 38, 48)  # 32 x 1.2 / 1.0 = 38.4, 32 x 1.5 = 48
    centre = lambda im: np.asarray(im.TransformContinuousIndexToPhysicalPoint(  # noqa: E731
        [(n - 1) / 2.0 for n in im.GetSize()]))
    assert np.allclose(centre(grid), centre(src), atol=1e-6)


def test_bspline_and_linear_agree_on_smooth_tissue_and_preserve_the_mean() -> None:
    ph, _ = phantom(0, size=32)
    src = image(ph, ph.clean["T2w"])
    lin = sitk.GetArrayFromImage(resample_image(src, (0.8, 0.8, 0.8), "linear"))
    bsp = sitk.GetArrayFromImage(resample_image(src, (0.8, 0.8, 0.8), "bspline"))
    assert lin.shape == bsp.shape == (40, 40, 40)
    assert abs(lin.mean() - ph.clean["T2w"].mean()) < 0.02 * ph.clean["T2w"].mean()
    assert np.median(np.abs(lin - bsp)) < 5.0  # of signal values in the hundreds
    rec = Resample((0.8, 0.8, 0.8), "bspline")(case(ph)).history[-1]
    assert rec["args"] == {"target_spacing": [0.8, 0.8, 0.8], "interpolator": "bspline"}
    assert rec["details"]["to_size"] == [40, 40, 40]
