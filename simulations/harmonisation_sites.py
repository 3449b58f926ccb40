"""Simulated hospitals for the harmonisation-effect experiment: a subtype that scanners hide.

The standard phantoms (:mod:`simulations.phantoms`) separate their two subtypes by large signal differences
that no scanner effect can hide. Here the anatomy, bias field, noise and scanner of each patient come from
:func:`simulations.phantoms.simulate_patient`, but the tumour's signal is re-drawn so that

* the label (subtype 1) raises the tumour's CET1 enhancement by ``enhancement`` and its T2w signal by
  ``t2_shift`` (relative), on top of a per-patient biological spread ``biological_sd``;
* each site's scanner multiplies and shifts every intensity (the presets' ``intensity_scale`` and
  ``intensity_offset``; ``scanner_strength`` > 1 exaggerates their spread around 1 and 0), adds its bias
  field and its Rician noise (higher at 1.5T); at 1.5T the CET1 scale is further multiplied by
  ``cet1_gain_1_5t`` (T1-weighted contrast depends on the field), so that no ratio of sequences is
  scanner-free;
* the label prevalence differs by field strength (``prevalence_1_5t`` vs ``prevalence_3t``): with the
  default design the 1.5T scanners, which scale intensities *down*, see *more* subtype-1 tumours, which are
  *brighter*; the scanner effect therefore works against the biological one, and a model trained on raw
  intensities across sites learns the scanner instead of the tumour.

The experiment's study (``common/studies/harmonisation.yaml``) sets ``scanner_strength: 1.5``, a strong
field-strength effect; with a converged logistic model on raw compact radiomics the pooled AUC then falls to
about 0.6-0.8 (seeds 0-2, 24 patients per site), against 0.8-0.97 after ComBat or image standardisation.

Intensity features measured inside the tumour are thus shifted and scaled per scanner: image-level
standardisation (the tumour relative to the patient's own body) or ComBat (per-site location and scale of each
feature) can recover the label signal; noise-driven texture differences between field strengths are left for
ComBat. Files follow ARCHITECTURE.md (``site.yaml``, ``clinical.csv``, images, masks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from common.imageio import array_to_image, write_image
from common.sitedata import Scanner, SimulatedEffects, SiteConfig, write_site_config
from simulations.phantoms import SEQUENCES, SUBTYPES, ScannerProfile, scanner_for_site, simulate_patient, site_id_for

log = logging.getLogger(__name__)

TUMOUR_BASE: dict[str, float] = {"T2w": 760.0, "CET1": 520.0}
"""Noise-free tumour signal of subtype 0 per sequence (same units as the phantoms' tissue signals)."""


@dataclass(frozen=True)
class EffectDesign:
    """How the label shows in the images, and how the scanners confound it."""

    enhancement: float = 0.22  # relative CET1 increase of the tumour for label 1
    t2_shift: float = 0.08  # relative T2w increase for label 1
    biological_sd: float = 0.07  # per-patient relative spread of the tumour signal
    texture_amplitude: float = 0.06  # within-tumour texture (relative)
    prevalence_1_5t: float = 0.7
    prevalence_3t: float = 0.3
    cet1_gain_1_5t: float = 0.85  # CET1 scale relative to T2w at 1.5T (T1 relaxation depends on the field)
    scanner_strength: float = 1.0  # >1: scales and offsets further from (1, 0) than the presets


def experiment_scanner(index: int, seed: int, strength: float) -> tuple[ScannerProfile, int]:
    """Site ``index``'s preset scanner with its scale/offset spread multiplied by ``strength``."""
    base, bias_seed = scanner_for_site(index, seed)
    scale = max(0.05, 1.0 + strength * (base.intensity_scale - 1.0))
    profile = ScannerProfile(base.vendor, base.model, base.field_strength, base.spacing, round(scale, 4),
                             round(strength * base.intensity_offset, 3), base.bias_amplitude, base.noise_sigma)
    return profile, bias_seed


def _texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def experiment_patient(index: int, patient: int, size: int, seed: int, design: EffectDesign,
                       scanner: ScannerProfile, bias_seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """One patient: images by sequence, tumour mask, clinical row (label drawn from the field strength)."""
    ph = simulate_patient(index, patient, size=size, seed=seed, scanner=scanner, bias_seed=bias_seed)
    rng = np.random.default_rng([seed, index, patient, 31_337])
    prevalence = design.prevalence_1_5t if scanner.field_strength < 2.0 else design.prevalence_3t
    label = int(rng.uniform() < prevalence)
    mask = ph.mask.astype(bool)
    texture = 1.0 + design.texture_amplitude * _texture(rng, mask.shape, 1.2)
    sigma = scanner.noise_sigma * 1000.0
    effect = {"T2w": design.t2_shift, "CET1": design.enhancement}
    gain = {"T2w": 1.0, "CET1": design.cet1_gain_1_5t if scanner.field_strength < 2.0 else 1.0}
    images: dict[str, np.ndarray] = {}
    for seq in SEQUENCES:
        signal = ph.clean[seq].astype(np.float64)
        level = TUMOUR_BASE[seq] * (1.0 + effect[seq] * label + design.biological_sd * float(rng.standard_normal()))
        signal[mask] = level * texture[mask]
        biased = signal * ph.bias
        rician = np.hypot(biased + sigma * rng.standard_normal(mask.shape), sigma * rng.standard_normal(mask.shape))
        images[seq] = (gain[seq] * scanner.intensity_scale * rician + scanner.intensity_offset).astype(np.float32)
    clinical = dict(ph.clinical)
    clinical.update(label=label, subtype=SUBTYPES[label])
    return images, ph.mask, clinical


def write_experiment_site(out_dir: Path | str, index: int, patients: int, size: int, seed: int,
                          design: EffectDesign) -> Path:
    """One simulated site of the experiment; returns its directory."""
    scanner, bias_seed = experiment_scanner(index, seed, design.scanner_strength)
    site_id = site_id_for(index)
    config = SiteConfig(
        site_id=site_id,
        name=f"Experiment hospital {index + 1} ({scanner.vendor} {scanner.model}, {scanner.field_strength}T)",
        scanner=Scanner(vendor=scanner.vendor, model=scanner.model, field_strength=scanner.field_strength,
                        spacing=scanner.spacing),
        sequences=SEQUENCES,
        reference_sequence="T2w",
        simulation=SimulatedEffects(intensity_scale=scanner.intensity_scale, intensity_offset=scanner.intensity_offset,
                                    bias_amplitude=scanner.bias_amplitude, noise_sigma=scanner.noise_sigma,
                                    seed=bias_seed),
    )
    site_dir = Path(out_dir) / site_id
    write_site_config(config, site_dir)
    rows = []
    for p in range(patients):
        images, mask, clinical = experiment_patient(index, p, size, seed, design, scanner, bias_seed)
        sx, sy, sz = scanner.spacing
        origin = (-(size - 1) / 2.0 * sx, -(size - 1) / 2.0 * sy, -(size - 1) / 2.0 * sz)
        pid = str(clinical["patient_id"])
        for seq, arr in images.items():
            write_image(array_to_image(arr, scanner.spacing, origin), site_dir / "images" / pid / f"{seq}.nii.gz")
        write_image(array_to_image(mask, scanner.spacing, origin), site_dir / "masks" / f"{pid}.nii.gz")
        rows.append(clinical)
    pd.DataFrame(rows).to_csv(site_dir / "clinical.csv", index=False)
    return site_dir


def simulate_experiment_sites(out_dir: Path | str, sites: int = 4, patients: int | list[int] = 24, size: int = 32,
                              seed: int = 0, design: EffectDesign | None = None) -> list[Path]:
    """``sites`` hospitals (presets alternate 3T and 1.5T scanners of different vendors) under ``out_dir``."""
    design = design or EffectDesign()
    counts = list(patients) if isinstance(patients, list) else [patients] * sites
    if len(counts) != sites:
        raise ValueError(f"got {len(counts)} patient counts for {sites} sites; give one count or one per site")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_experiment_site(out, i, counts[i], size, seed, design) for i in range(sites)]
    log.info("wrote %d experiment sites under %s", sites, out)
    return paths
