"""Diffusion and perfusion series of a simulated patient, with their ground-truth maps.

The anatomy is the patient's phantom (:func:`simulations.phantoms.simulate_patient`); each tissue class, and the
tumour by subtype (core and rim), has its own ADC, Ktrans, ve and native T1. The dense "homogeneous" subtype
restricts diffusion (low ADC) and is moderately perfused; the "necrotic-rim" subtype has a well-perfused rim and
a necrotic core with free diffusion and almost no uptake. Inside the tumour ADC and Ktrans carry a smooth
texture; ``kep = Ktrans / ve`` is constant per tissue class, so that a class's Tofts curve is one convolution.

- DWI: ``S = S0 exp(-b ADC)`` (mono-exponential, so the truth is the ADC a fit should recover), Rician noise.
- DCE: Parker's population AIF from dcmri, the standard Tofts tissue concentration (exact exponential
  convolution on a fine time grid), SPGR steady-state signal with the tissue's T10 (dcmri ``signal_ss``), Rician
  noise; the scanner sets the temporal resolution, the number of frames, TR and flip angle.

Randomness comes from its own stream ``(seed, site, patient, 1717)``: adding DWI/DCE changes no other draw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.imageio import array_to_image, write_image
from common.maps.layout import DCE, DWI, DCESidecar

# Tissue labels of simulations.phantoms.TISSUES: 0 background, 1 body, 2 fat, 3 organ, 4 tumour.
ADC_MM2_S = {1: 1.4e-3, 2: 0.6e-3, 3: 1.8e-3}
KTRANS_PER_MIN = {1: 0.05, 2: 0.02, 3: 0.20}
VE = {1: 0.15, 2: 0.10, 3: 0.25}
T10_S = {0: 1.0, 1: 1.2, 2: 0.35, 3: 1.0, 4: 1.5}
DWI_S0 = {0: 0.0, 1: 550.0, 2: 200.0, 3: 800.0, 4: 750.0}
# Tumour by subtype: (core, rim).
TUMOUR_ADC = {0: (0.75e-3, 0.75e-3), 1: (2.2e-3, 1.0e-3)}
TUMOUR_KTRANS = {0: (0.15, 0.15), 1: (0.03, 0.45)}
TUMOUR_VE = {0: (0.30, 0.30), 1: (0.60, 0.40)}
TUMOUR_TEXTURE_AMPLITUDE = 0.08
DCE_M0 = 1500.0
HEMATOCRIT = 0.45
RELAXIVITY = 4.5  # 1/(mM s), gadobutrol-like at 1.5-3 T


@dataclass(frozen=True)
class Acquisition:
    """A simulated scanner's DWI and DCE protocol."""

    bvals: tuple[float, ...]
    dt_s: float
    frames: int
    tr_s: float
    flip_deg: float
    injection_s: float


def acquisition_for(field_strength: float, site_index: int) -> Acquisition:
    """The scanner's protocol: 3 T sites sample DCE faster; sites alternate b-value schemes."""
    bvals = (0.0, 500.0, 1000.0) if site_index % 2 == 0 else (0.0, 100.0, 500.0, 800.0)
    if field_strength >= 3.0:
        return Acquisition(bvals, 3.0, 80, 0.004, 15.0, 30.0)
    return Acquisition(bvals, 4.5, 54, 0.005, 12.0, 31.5)


@dataclass(frozen=True)
class MultiparametricPhantom:
    """The 4D series and the truth of one patient, arrays in (volume, z, y, x)."""

    dwi: np.ndarray
    bvals: tuple[float, ...]
    dce: np.ndarray
    sidecar: DCESidecar
    t10: np.ndarray
    truth: dict[str, np.ndarray]  # ADC (mm2/s), Ktrans (1/min), ve


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _maps(tissues: np.ndarray, mask: np.ndarray, subtype: int, spacing: tuple[float, float, float],
          rng: np.random.Generator) -> dict[str, np.ndarray]:
    from scipy import ndimage

    adc = np.zeros(tissues.shape)
    ktrans = np.zeros(tissues.shape)
    ve = np.zeros(tissues.shape)
    for label in (1, 2, 3):
        sel = tissues == label
        adc[sel], ktrans[sel], ve[sel] = ADC_MM2_S[label], KTRANS_PER_MIN[label], VE[label]
    tumour = mask > 0
    inner = ndimage.distance_transform_edt(tumour, sampling=spacing[::-1]) > 2.0
    for part, sel in ((0, tumour & inner), (1, tumour & ~inner)):
        adc[sel], ktrans[sel], ve[sel] = TUMOUR_ADC[subtype][part], TUMOUR_KTRANS[subtype][part], \
            TUMOUR_VE[subtype][part]
    texture = 1.0 + TUMOUR_TEXTURE_AMPLITUDE * _smooth(rng, tissues.shape, 1.5)
    adc[tumour] *= texture[tumour]
    ktrans[tumour] *= texture[tumour]
    ve[tumour] *= texture[tumour]  # kep stays the class's: one convolution per class
    return {"ADC": adc, "Ktrans": ktrans, "ve": ve}


def _tofts_unit_curves(times: np.ndarray, kep_per_s: np.ndarray, injection_s: float) -> np.ndarray:
    """Cp (*) exp(-kep t) on the acquisition times for each kep, from a 0.05 s grid (exact exponential kernel)."""
    import dcmri

    fine = np.arange(0.0, float(times[-1]) + 0.05, 0.05)
    cp = 1000.0 * np.asarray(dcmri.aif_parker(fine, injection_s)) / (1.0 - HEMATOCRIT)
    out = np.empty((kep_per_s.size, times.size))
    for i, kep in enumerate(kep_per_s):
        conv = np.convolve(cp, np.exp(-kep * fine))[: fine.size] * 0.05
        out[i] = np.interp(times, fine, conv)
    return out


def spgr_signal(m0: float, r1: np.ndarray, tr_s: float, flip_deg: float) -> np.ndarray:
    """Spoiled gradient echo in steady state, ``M0 sin a (1 - E1) / (1 - cos a E1)`` with ``E1 = exp(-TR R1)``:
    dcmri's ``signal_ss`` for one compartment, which loops over elements in Python (40 s a 48^3 x 80 series);
    tests/imaging/test_maps.py checks the two agree."""
    e1 = np.exp(-tr_s * np.asarray(r1, dtype=np.float64))
    a = np.deg2rad(flip_deg)
    return m0 * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1)


def simulate_multiparametric(tissues: np.ndarray, mask: np.ndarray, subtype: int,
                             spacing: tuple[float, float, float], field_strength: float, noise_sigma: float,
                             seed: int, site_index: int, patient_index: int) -> MultiparametricPhantom:
    """DWI and DCE series of one patient (see the module docstring)."""
    rng = np.random.default_rng([seed, site_index, patient_index, 1717])
    acq = acquisition_for(field_strength, site_index)
    truth = _maps(tissues, mask, subtype, spacing, rng)
    body = tissues > 0
    s0 = np.vectorize(DWI_S0.get)(tissues).astype(np.float64)
    b = np.asarray(acq.bvals)
    dwi_clean = s0[None] * np.exp(-b[:, None, None, None] * truth["ADC"][None])
    sigma = noise_sigma * 1000.0
    dwi = np.hypot(dwi_clean + sigma * rng.standard_normal(dwi_clean.shape),
                   sigma * rng.standard_normal(dwi_clean.shape))
    times = np.arange(acq.frames) * acq.dt_s
    t10 = np.vectorize(T10_S.get)(tissues).astype(np.float64)
    conc = np.zeros((acq.frames,) + tissues.shape)
    kep_per_s = np.divide(truth["Ktrans"] / 60.0, truth["ve"], out=np.zeros(tissues.shape), where=truth["ve"] > 0)
    keys, inverse = np.unique(np.round(kep_per_s[body], 10), return_inverse=True)
    unit = _tofts_unit_curves(times, keys, acq.injection_s)
    conc[:, body] = (truth["Ktrans"][body] / 60.0)[None, :] * unit[inverse].T
    r1 = 1.0 / t10[None] + RELAXIVITY * conc
    signal = spgr_signal(DCE_M0, r1, acq.tr_s, acq.flip_deg) * body[None]
    dce_sigma = noise_sigma * float(np.mean(signal[0][body]))
    dce = np.hypot(signal + dce_sigma * rng.standard_normal(signal.shape),
                   dce_sigma * rng.standard_normal(signal.shape))
    sidecar = DCESidecar(
        AcquisitionTimes_s=tuple(float(t) for t in times), RepetitionTime_s=acq.tr_s, FlipAngle_deg=acq.flip_deg,
        T10_s=None, Relaxivity_per_mM_s=RELAXIVITY, Hematocrit=HEMATOCRIT, InjectionTime_s=acq.injection_s,
        AIF="population:parker", BaselineVolumes=max(1, int(acq.injection_s // acq.dt_s)),
    )
    return MultiparametricPhantom(dwi.astype(np.float32), acq.bvals, dce.astype(np.float32), sidecar,
                                  t10.astype(np.float32), {k: v.astype(np.float32) for k, v in truth.items()})


def series_image(volumes: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
                 dt: float = 1.0) -> sitk.Image:
    """A 4D SimpleITK image from (volume, z, y, x): the 3D grid, and ``dt`` as the fourth spacing."""
    image = sitk.JoinSeries([array_to_image(v, spacing, origin) for v in volumes])
    image.SetSpacing((*[float(s) for s in spacing], float(dt)))
    return image


def write_multiparametric(ph: MultiparametricPhantom, case_dir: Path, truth_dir: Path | None,
                          spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> None:
    """Write ``DWI.nii.gz`` + ``DWI.bval``, ``DCE.nii.gz`` + ``DCE.json`` + ``T10.nii.gz`` into a case folder, and
    the truth maps as ``truth_dir/<MAP>.nii.gz``."""
    case_dir.mkdir(parents=True, exist_ok=True)
    write_image(series_image(ph.dwi, spacing, origin), case_dir / f"{DWI}.nii.gz")
    (case_dir / f"{DWI}.bval").write_text(" ".join(f"{b:g}" for b in ph.bvals) + "\n", encoding="utf-8")
    dt = float(np.diff(ph.sidecar.AcquisitionTimes_s).mean())
    write_image(series_image(ph.dce, spacing, origin, dt), case_dir / f"{DCE}.nii.gz")
    (case_dir / f"{DCE}.json").write_text(json.dumps(ph.sidecar.model_dump(mode="json"), indent=1), encoding="utf-8")
    write_image(array_to_image(ph.t10, spacing, origin), case_dir / "T10.nii.gz")
    if truth_dir is not None:
        for name, arr in ph.truth.items():
            write_image(array_to_image(arr, spacing, origin), truth_dir / f"{name}.nii.gz")


__all__ = ["Acquisition", "MultiparametricPhantom", "acquisition_for", "series_image", "simulate_multiparametric",
           "spgr_signal", "write_multiparametric"]
