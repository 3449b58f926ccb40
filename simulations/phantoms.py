"""Deterministic multi-site MRI phantoms with known ground truth.

Each simulated hospital has its own scanner (vendor intensity scale and offset, a smooth multiplicative
bias field, Rician noise by field strength, voxel spacing), written to ``site.yaml``; each patient has
co-registered T2w and CET1 volumes of a body phantom with tissue classes and one irregular tumour of one
of two subtypes, its ground-truth mask, and a ``clinical.csv`` row whose survival is drawn from a hazard
that depends on the tumour (size, heterogeneity, subtype), with censoring.

All randomness comes from ``numpy.random.default_rng`` seeded by (seed, site, patient), so a site's
content does not depend on how many other sites or patients are generated.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from common.imageio import array_to_image, write_image
from common.maps.layout import FOUR_D
from common.sitedata import (
    DEFAULT_COLUMNS,
    RATERS_DIR,
    ClinicalColumn,
    Scanner,
    SimulatedEffects,
    SiteConfig,
    SitePolicy,
    write_site_config,
)
from simulations.phantoms_mp import simulate_multiparametric, write_multiparametric

log = logging.getLogger(__name__)

SEQUENCES: tuple[str, ...] = ("T2w", "CET1")
TISSUES: dict[str, int] = {"background": 0, "body": 1, "fat": 2, "organ": 3, "tumour": 4}
SUBTYPES: dict[int, str] = {0: "homogeneous", 1: "necrotic-rim"}
# Noise-free signal of each tissue per sequence (arbitrary units before the scanner's scale/offset).
TISSUE_SIGNAL: dict[str, dict[int, float]] = {
    "T2w": {0: 0.0, 1: 300.0, 2: 600.0, 3: 850.0},
    "CET1": {0: 0.0, 1: 400.0, 2: 500.0, 3: 250.0},
}
# Tumour signal per subtype: (core, rim) for each sequence.
TUMOUR_SIGNAL: dict[str, dict[int, tuple[float, float]]] = {
    "T2w": {0: (700.0, 700.0), 1: (950.0, 650.0)},
    "CET1": {0: (620.0, 620.0), 1: (150.0, 950.0)},
}
TUMOUR_TEXTURE: dict[int, tuple[float, float]] = {0: (1.0, 0.04), 1: (1.5, 0.15)}  # (sigma vox, amplitude)
BASELINE_HAZARD_PER_DAY = np.log(2.0) / 600.0
HAZARD_COEF = {"subtype": 0.9, "log_volume": 0.6, "heterogeneity": 3.0}
# A genomic marker with a known association: P(tp53_mutation = 1 | subtype), drawn from its own stream so that
# every image and survival draw stays what it was (the radiogenomics phase should find the subtype's features).
MUTATION_RATE = {0: 0.1, 1: 0.9}
GENOMIC_COLUMNS = {"tp53_mutation": ClinicalColumn(kind="categorical", uses=("genomic", "covariate"))}
# Centres of the hazard covariates: typical tumour volume (fraction of the field of view), heterogeneity.
REFERENCE_LOG_VOLUME_FRACTION = np.log(0.008)
REFERENCE_HETEROGENEITY = 0.08


@dataclass(frozen=True)
class ScannerProfile:
    """A simulated scanner; its effects are the ground truth that harmonisation must remove."""

    vendor: str
    model: str
    field_strength: float
    spacing: tuple[float, float, float]
    intensity_scale: float
    intensity_offset: float
    bias_amplitude: float
    noise_sigma: float  # as a fraction of 1000 signal units; higher at 1.5T


SCANNER_PRESETS: tuple[ScannerProfile, ...] = (
    ScannerProfile("Siemens", "Skyra", 3.0, (1.0, 1.0, 1.0), 1.00, 0.0, 0.20, 0.015),
    ScannerProfile("GE", "Signa HDxt", 1.5, (1.2, 1.2, 1.5), 0.65, 60.0, 0.30, 0.040),
    ScannerProfile("Philips", "Ingenia", 3.0, (1.1, 1.1, 1.25), 1.40, -30.0, 0.15, 0.020),
    ScannerProfile("Siemens", "Avanto", 1.5, (1.25, 1.25, 1.4), 0.80, 20.0, 0.25, 0.045),
    ScannerProfile("GE", "Discovery MR750", 3.0, (1.0, 1.0, 1.2), 1.20, 10.0, 0.18, 0.018),
)


@dataclass(frozen=True)
class PatientPhantom:
    """Everything about one simulated patient, in (z, y, x) arrays on the site's grid."""

    patient_id: str
    images: dict[str, np.ndarray]
    clean: dict[str, np.ndarray]  # noise-free, bias-free signal before the scanner's scale/offset
    tissues: np.ndarray
    mask: np.ndarray
    bias: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    clinical: dict[str, object]


def rater_mask(truth: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Another radiologist's outline of the tumour ``truth`` (z, y, x): the boundary moved by a smooth field of
    about half a voxel plus the rater's own tendency to draw wider or tighter, and now and then a missed part at
    the edge or an extra island beside the tumour (the disagreements of the seed's inter-observer table)."""
    t = truth > 0
    sampling = tuple(float(v) for v in spacing[::-1])
    unit = float(np.mean(spacing))
    sdf = (ndimage.distance_transform_edt(t, sampling=sampling)
           - ndimage.distance_transform_edt(~t, sampling=sampling)) / unit  # voxels, > 0 inside
    shift = 0.6 * _smooth_noise(rng, t.shape, 2.0) + float(rng.normal(0.0, 0.25))
    mask = (sdf + shift) > 0.0
    zz, yy, xx = np.indices(t.shape)
    edge = np.argwhere(t & ~ndimage.binary_erosion(t))
    if edge.size and rng.uniform() < 0.3:  # a part at the edge left out
        c = edge[int(rng.integers(len(edge)))]
        mask &= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) > float(rng.uniform(1.5, 2.5)) ** 2
    if edge.size and rng.uniform() < 0.3:  # an extra island a few voxels outside
        ring = ndimage.binary_dilation(t, iterations=6) & ~ndimage.binary_dilation(t, iterations=3)
        spots = np.argwhere(ring)
        if spots.size:
            c = spots[int(rng.integers(len(spots)))]
            mask |= ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= float(rng.uniform(1.0, 1.8)) ** 2
    return mask.astype(np.uint8)


def site_id_for(index: int) -> str:
    """The id of the simulated site with 0-based ``index``."""
    return f"site-{index + 1:03d}"


def scanner_for_site(index: int, seed: int) -> tuple[ScannerProfile, int]:
    """The scanner of simulated site ``index`` and the seed of its bias field."""
    base = SCANNER_PRESETS[index % len(SCANNER_PRESETS)]
    rng = np.random.default_rng([seed, index, 7_777])
    if index >= len(SCANNER_PRESETS):  # further sites: the same vendors, perturbed
        base = ScannerProfile(
            base.vendor, base.model, base.field_strength, base.spacing,
            round(base.intensity_scale * float(rng.uniform(0.85, 1.15)), 4),
            round(base.intensity_offset + float(rng.uniform(-15, 15)), 2),
            base.bias_amplitude, base.noise_sigma,
        )
    return base, int(rng.integers(0, 2**31 - 1))


def _grid(size: int, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Physical (z, y, x) coordinates in mm of a grid centred on 0, and its origin in (x, y, z)."""
    sx, sy, sz = spacing
    origin = tuple(-(size - 1) / 2.0 * s for s in (sx, sy, sz))
    z = origin[2] + sz * np.arange(size)
    y = origin[1] + sy * np.arange(size)
    x = origin[0] + sx * np.arange(size)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return zz, yy, xx, origin


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def bias_field(size: int, spacing: tuple[float, float, float], amplitude: float, seed: int) -> np.ndarray:
    """A smooth multiplicative field that spans exactly [1 - a, 1 + a] inside the body ellipsoid."""
    zz, yy, xx, _ = _grid(size, spacing)
    half = size / 2.0
    u, v, w = xx / half, yy / half, zz / half
    c = np.random.default_rng(seed).uniform(-1, 1, size=6)
    f = c[0] * u + c[1] * v + c[2] * w + c[3] * u * v + c[4] * (u**2 - v**2) + 0.5 * c[5] * w**2
    inside = _body_ellipsoid(zz, yy, xx, size, 1.0) <= 1.0
    lo, hi = f[inside].min(), f[inside].max()
    f = (2.0 * (f - lo) / (hi - lo) - 1.0) if hi > lo else np.zeros_like(f)
    return 1.0 + amplitude * f


def _body_ellipsoid(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int, factor: float) -> np.ndarray:
    a, b, c = (0.40 * size * factor, 0.33 * size * factor, 0.36 * size * factor)
    return (xx / a) ** 2 + (yy / b) ** 2 + (zz / c) ** 2


def _tumour(rng: np.random.Generator, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, body: np.ndarray,
            size: int, spacing: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """An irregular, connected tumour mask inside the body, and its nominal radius (mm)."""
    for _ in range(50):
        radius = float(rng.uniform(0.08, 0.15)) * size
        centre = rng.uniform(-0.18, 0.18, size=3) * size  # x, y, z in mm
        dist = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2) / radius
        sigma_vox = max(1.0, 0.3 * radius / float(np.mean(spacing)))
        perturb = _smooth_noise(rng, dist.shape, sigma_vox)
        mask = (dist + 0.35 * perturb) < 1.0
        mask &= body
        labels, n = ndimage.label(mask)
        if n == 0:
            continue
        largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
        mask = labels == largest
        if mask.sum() >= 30:
            return mask, radius
    raise RuntimeError("could not place a tumour inside the body; increase --size")


def simulate_patient(
    site_index: int, patient_index: int, size: int = 64, seed: int = 0,
    scanner: ScannerProfile | None = None, bias_seed: int | None = None,
) -> PatientPhantom:
    """One patient of one simulated site, deterministic in (seed, site_index, patient_index)."""
    if scanner is None or bias_seed is None:
        scanner, bias_seed = scanner_for_site(site_index, seed)
    rng = np.random.default_rng([seed, site_index, patient_index])
    zz, yy, xx, origin = _grid(size, scanner.spacing)
    factor = float(rng.uniform(0.9, 1.05))
    body_r = _body_ellipsoid(zz, yy, xx, size, factor)
    body = body_r <= 1.0
    tissues = np.zeros(body.shape, dtype=np.uint8)
    tissues[body] = TISSUES["body"]
    tissues[(body_r > 0.82) & body] = TISSUES["fat"]
    oc = rng.uniform(-0.1, 0.1, size=3) * size
    organ = (((xx - oc[0]) / (0.16 * size)) ** 2 + ((yy - oc[1]) / (0.12 * size)) ** 2
             + ((zz - oc[2]) / (0.14 * size)) ** 2) <= 1.0
    tissues[organ & body] = TISSUES["organ"]
    subtype = int(rng.integers(0, 2))
    mask, _ = _tumour(rng, zz, yy, xx, (tissues == TISSUES["body"]) | (tissues == TISSUES["organ"]), size,
                      scanner.spacing)
    tissues[mask] = TISSUES["tumour"]
    inner = ndimage.distance_transform_edt(mask, sampling=scanner.spacing[::-1]) > 2.0
    rim = mask & ~inner
    tissue_texture = 1.0 + 0.03 * _smooth_noise(rng, body.shape, 3.0)
    t_sigma, t_amp = TUMOUR_TEXTURE[subtype]
    tumour_texture = 1.0 + t_amp * _smooth_noise(rng, body.shape, t_sigma)
    heterogeneity = float(np.std(tumour_texture[mask]))
    bias = bias_field(size, scanner.spacing, scanner.bias_amplitude, bias_seed)
    clean: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    sigma = scanner.noise_sigma * 1000.0
    for seq in SEQUENCES:
        signal = np.zeros(body.shape, dtype=np.float64)
        for label, value in TISSUE_SIGNAL[seq].items():
            signal[tissues == label] = value
        signal *= tissue_texture
        core_v, rim_v = TUMOUR_SIGNAL[seq][subtype]
        signal[mask & inner] = core_v
        signal[rim] = rim_v
        signal[mask] *= tumour_texture[mask]
        clean[seq] = signal.astype(np.float32)
        biased = signal * bias
        rician = np.hypot(biased + sigma * rng.standard_normal(body.shape), sigma * rng.standard_normal(body.shape))
        images[seq] = (scanner.intensity_scale * rician + scanner.intensity_offset).astype(np.float32)
    voxel_ml = float(np.prod(scanner.spacing)) / 1000.0
    volume_ml = float(mask.sum()) * voxel_ml
    fov_ml = float(np.prod(scanner.spacing)) * size**3 / 1000.0
    risk = (HAZARD_COEF["subtype"] * subtype
            + HAZARD_COEF["log_volume"] * (np.log(volume_ml / fov_ml) - REFERENCE_LOG_VOLUME_FRACTION)
            + HAZARD_COEF["heterogeneity"] * (heterogeneity - REFERENCE_HETEROGENEITY))
    event_time = -np.log(rng.uniform()) / (BASELINE_HAZARD_PER_DAY * np.exp(risk))
    censor_time = rng.uniform(250.0, 1800.0)
    clinical = {
        "patient_id": f"{site_id_for(site_index)}-p{patient_index + 1:03d}",
        "age": round(float(rng.uniform(0.5, 15.0)), 1),
        "sex": str(rng.choice(["F", "M"])),
        "label": subtype,
        "os_days": max(1, int(round(min(event_time, censor_time)))),
        "os_event": int(event_time <= censor_time),
        "subtype": SUBTYPES[subtype],
        "tumour_volume_ml": round(volume_ml, 3),
        "tp53_mutation": int(np.random.default_rng([seed, site_index, patient_index, 53]).uniform()
                             < MUTATION_RATE[subtype]),
    }
    return PatientPhantom(
        patient_id=str(clinical["patient_id"]), images=images, clean=clean, tissues=tissues,
        mask=mask.astype(np.uint8), bias=bias.astype(np.float32), spacing=scanner.spacing,
        origin=origin, clinical=clinical,
    )


def site_config_for(index: int, seed: int, sequences: tuple[str, ...] = SEQUENCES) -> SiteConfig:
    """The ``site.yaml`` content of simulated site ``index`` (``sequences``: T2w, CET1 and optionally the 4D
    DWI and DCE series of :mod:`simulations.phantoms_mp`)."""
    scanner, bias_seed = scanner_for_site(index, seed)
    return SiteConfig(
        site_id=site_id_for(index),
        name=f"Simulated hospital {index + 1} ({scanner.vendor} {scanner.model}, {scanner.field_strength}T)",
        scanner=Scanner(vendor=scanner.vendor, model=scanner.model, field_strength=scanner.field_strength,
                        spacing=scanner.spacing),
        sequences=tuple(sequences),
        reference_sequence="T2w",
        policy=SitePolicy(columns={**DEFAULT_COLUMNS, **GENOMIC_COLUMNS}),
        simulation=SimulatedEffects(
            intensity_scale=scanner.intensity_scale, intensity_offset=scanner.intensity_offset,
            bias_amplitude=scanner.bias_amplitude, noise_sigma=scanner.noise_sigma, seed=bias_seed,
        ),
    )


def clear_simulated_site(site_dir: Path) -> None:
    """Remove an earlier simulated site at ``site_dir`` (its images, and its ``derived/`` state: features, ledgers
    of patients that no longer exist); refuse to touch a folder that is not a simulated site."""
    if not site_dir.exists():
        return
    yaml_path = site_dir / "site.yaml"
    text = yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else ""
    if "simulation:" not in text:
        raise FileExistsError(f"{site_dir} exists and is not a simulated site. Fix: simulate into an empty folder")
    shutil.rmtree(site_dir)


def write_site(out_dir: Path | str, index: int, patients: int, size: int = 64, seed: int = 0,
               write_truth: bool = True, unlabelled: int = 0, raters: int = 1, rated_fraction: float = 1.0,
               sequences: tuple[str, ...] = SEQUENCES) -> Path:
    """Generate one simulated site in the layout of ARCHITECTURE.md; returns its directory.

    The last ``unlabelled`` patients get no ``masks/`` file (cases for the federated model to segment); their
    ground-truth mask goes to ``truth/<patient_id>_mask.nii.gz`` with the tissue labels. With ``raters`` > 1, a
    ``rated_fraction`` of the labelled patients (drawn per patient) also get the outlines of raters 2..``raters``
    (:func:`rater_mask`) under ``raters/<patient_id>/rater<k>.nii.gz``; ``masks/`` is rater 1. ``sequences`` with
    DWI and/or DCE adds those 4D series (both are written; the site lists what it was asked for) and their truth
    maps under ``truth/<patient_id>/``.
    """
    unknown = [q for q in sequences if q not in (*SEQUENCES, *FOUR_D)]
    if unknown or not set(SEQUENCES) <= set(sequences):
        raise ValueError(f"simulated sites have T2w and CET1 and optionally {list(FOUR_D)}; got {list(sequences)}")
    config = site_config_for(index, seed, tuple(sequences))
    scanner, bias_seed = scanner_for_site(index, seed)
    site_dir = Path(out_dir) / config.site_id
    clear_simulated_site(site_dir)
    write_site_config(config, site_dir)
    rows = []
    for p in range(patients):
        ph = simulate_patient(index, p, size=size, seed=seed, scanner=scanner, bias_seed=bias_seed)
        for seq, arr in ph.images.items():
            write_image(array_to_image(arr, ph.spacing, ph.origin),
                        site_dir / "images" / ph.patient_id / f"{seq}.nii.gz")
        labelled = p < patients - unlabelled
        mask_path = (site_dir / "masks" / f"{ph.patient_id}.nii.gz" if labelled
                     else site_dir / "truth" / f"{ph.patient_id}_mask.nii.gz")
        write_image(array_to_image(ph.mask, ph.spacing, ph.origin), mask_path)
        rater_rng = np.random.default_rng([seed, index, p, 4_242])
        if labelled and raters > 1 and rater_rng.uniform() < rated_fraction:
            for k in range(2, raters + 1):
                write_image(array_to_image(rater_mask(ph.mask, ph.spacing, rater_rng), ph.spacing, ph.origin),
                            site_dir / RATERS_DIR / ph.patient_id / f"rater{k}.nii.gz")
        if write_truth:
            write_image(array_to_image(ph.tissues, ph.spacing, ph.origin),
                        site_dir / "truth" / f"{ph.patient_id}_tissues.nii.gz")
        if set(FOUR_D) & set(sequences):
            mp = simulate_multiparametric(ph.tissues, ph.mask, int(str(ph.clinical["label"])), ph.spacing,
                                          scanner.field_strength, scanner.noise_sigma, seed, index, p)
            write_multiparametric(mp, site_dir / "images" / ph.patient_id,
                                  site_dir / "truth" / ph.patient_id if write_truth else None, ph.spacing, ph.origin)
        rows.append(ph.clinical)
    pd.DataFrame(rows).to_csv(site_dir / "clinical.csv", index=False)
    return site_dir


def simulate_sites(out_dir: Path | str, sites: int = 3, patients: int | list[int] = 12, size: int = 64,
                   seed: int = 0, progress: bool = False, unlabelled: int = 0, raters: int = 1,
                   rated_fraction: float = 1.0, sequences: tuple[str, ...] = SEQUENCES) -> list[Path]:
    """Generate ``sites`` simulated hospitals under ``out_dir``; ``patients`` may differ per site.

    ``unlabelled`` patients per site come without a tumour mask, ``raters`` > 1 gives a ``rated_fraction`` of the
    labelled ones further raters' masks (see :func:`write_site`).
    """
    counts = list(patients) if isinstance(patients, list) else [patients] * sites
    if len(counts) != sites:
        raise ValueError(f"got {len(counts)} patient counts for {sites} sites; give one count or one per site")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    iterator: Iterable[int] = range(sites)
    if progress:
        from rich.progress import track

        iterator = track(iterator, description="Simulating hospitals")
    if any(unlabelled >= c for c in counts):
        raise ValueError(f"unlabelled={unlabelled} leaves a site without any labelled patient")
    paths = [write_site(out, i, counts[i], size=size, seed=seed, unlabelled=unlabelled, raters=raters,
                        rated_fraction=rated_fraction, sequences=tuple(sequences)) for i in iterator]
    log.info("wrote %d simulated sites under %s", sites, out)
    return paths
