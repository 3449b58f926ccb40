"""Rigid registration (Mattes MI) recovers a known displacement of one sequence to within one voxel."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from client.preprocessing.base import CaseVolumes
from client.preprocessing.register import RigidRegister, register_rigid
from client.preprocessing.resample import resample_onto
from common.imageio import geometry_mismatches
from tests.preprocessing.phantom_cases import image, phantom


def _known_motion() -> sitk.Euler3DTransform:
    motion = sitk.Euler3DTransform()
    motion.SetRotation(math.radians(4.0), math.radians(-3.0), math.radians(5.0))
    motion.SetTranslation((3.0, -2.5, 2.0))
    return motion


def test_registration_recovers_a_known_rigid_displacement_within_one_voxel() -> None:
    ph, _ = phantom(1, size=48)  # 1.2 x 1.2 x 1.5 mm voxels
    fixed = image(ph, ph.images["T2w"])
    cet1 = image(ph, ph.images["CET1"])
    motion = _known_motion()
    moving = resample_onto(cet1, cet1, "linear", motion)  # moving(x) = CET1(motion(x)): the patient moved
    found, _ = register_rigid(fixed, moving)
    truth = motion.GetInverse()  # the transform that maps fixed points into the moved image
    body = np.argwhere(ph.tissues > 0)[::5, ::-1]  # (x, y, z) voxel indices of the body
    errors = []
    for idx in body:
        p = fixed.TransformIndexToPhysicalPoint([int(v) for v in idx])
        errors.append(math.dist(found.TransformPoint(p), truth.TransformPoint(p)))
    moved_mm = max(math.dist(fixed.TransformIndexToPhysicalPoint([int(v) for v in i]),
                             truth.TransformPoint(fixed.TransformIndexToPhysicalPoint([int(v) for v in i])))
                   for i in body)
    assert moved_mm > 4.0  # the displacement is several voxels
    assert max(errors) < min(ph.spacing), (max(errors), min(ph.spacing))


def test_register_step_realigns_the_moved_sequence_onto_the_reference() -> None:
    ph, _ = phantom(0, size=32)
    cet1 = image(ph, ph.images["CET1"])
    motion = _known_motion()
    moving = resample_onto(cet1, cet1, "linear", motion)
    case = CaseVolumes("p", {"T2w": image(ph, ph.images["T2w"]), "CET1": moving}, None, "T2w")
    out = RigidRegister()(case)
    # the best possible result: the moved image brought back through the exact inverse motion
    ideal = sitk.GetArrayFromImage(resample_onto(moving, case.images["T2w"], "linear", motion.GetInverse()))
    body = ph.tissues > 0
    err_before = np.abs(sitk.GetArrayFromImage(moving) - ideal)[body].mean()
    err_after = np.abs(sitk.GetArrayFromImage(out.images["CET1"]) - ideal)[body].mean()
    assert err_after < 0.2 * err_before, (err_before, err_after)
    rec = out.history[-1]
    assert rec["step"] == "register" and "T2w" not in rec["details"]
    assert abs(rec["details"]["CET1"]["rotation_deg"][2] + 5.0) < 1.0  # the inverse of the known 5 degrees
    assert out.images["T2w"] is case.images["T2w"]
    assert not geometry_mismatches(out.images["CET1"], case.images["T2w"])


def _denoised_bias_corrected(site: int, patient: int) -> CaseVolumes:
    from client.preprocessing.pipeline import build_pipeline
    from common.config import PreprocessingConfig

    ph, _ = phantom(site, size=48, patient=patient)
    case = CaseVolumes("p", {s: image(ph, ph.images[s].astype(np.float32)) for s in ("T2w", "CET1")}, None, "T2w")
    return build_pipeline(PreprocessingConfig(steps=("denoise", "bias")))(case)


def test_aligned_sequences_stay_aligned_after_denoising_and_n4_on_a_noisy_15t_site() -> None:
    """The phantoms' sequences are aligned; the default pipeline (NLM, N4, then registration) must leave them so.
    With 32 histogram bins the optimiser walked 5-12 mm off on these 1.5T cases (a segmentation network then saw
    CET1 shifted against the mask); the guard and 16 bins keep it within a tenth of a voxel."""
    for patient in (1, 2):
        case = _denoised_bias_corrected(1, patient)  # site-002: GE 1.5T, noise 4 %, offset 60
        moved, _ = register_rigid(case.images["T2w"], case.images["CET1"])
        assert max(abs(t) for t in moved.GetTranslation()) < 0.3, moved.GetTranslation()
        # the guard alone, with the old bins (unguarded: 1.7 and 8.5 mm off): never worse than where it started
        guarded, metric = register_rigid(case.images["T2w"], case.images["CET1"], histogram_bins=32)
        assert max(abs(t) for t in guarded.GetTranslation()) < 1.0, guarded.GetTranslation()
        assert math.isfinite(metric)
