"""A simple imaging signature of simulated (or any) sites, for demos and tests of the outcomes phase.

Per patient: tumour volume (ml, log) and the mean and sd of each sequence inside the tumour mask; each
site z-scores its own columns (a crude per-site harmonisation that removes the scanner's scale and offset)
and writes ``derived/signature_scores.csv`` (``patient_id`` + numeric columns), the file the outcomes
phase reads first. The real pipeline's signature comes from the features/harmonisation/reduction phases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from common.errors import SiteDataError
from common.imageio import read_image
from common.sitedata import case_paths, load_site_config, read_clinical

log = logging.getLogger(__name__)
SIGNATURE_FILE = "signature_scores.csv"


def tumour_features(site_dir: Path | str) -> pd.DataFrame:
    """Log tumour volume and per-sequence mean/sd inside the mask, one row per case with images and a mask.

    Cases are not validated here (run ``fedbiopsy validate`` first); incomplete ones are skipped.
    """
    root = Path(site_dir)
    config = load_site_config(root)
    rows = {}
    for pid in read_clinical(root)["patient_id"]:
        images, mask_path = case_paths(root, pid, config.sequences)
        if mask_path is None or any(p is None for p in images.values()):
            log.warning("site %s: case %s lacks a mask or a sequence; left out of the signature", config.site_id, pid)
            continue
        mask_img = read_image(mask_path)
        mask = sitk.GetArrayFromImage(mask_img) > 0
        if not mask.any():
            continue
        voxel_ml = float(np.prod(mask_img.GetSpacing())) / 1000.0
        row = {"log_volume_ml": float(np.log(mask.sum() * voxel_ml))}
        for seq, path in images.items():
            values = sitk.GetArrayFromImage(read_image(str(path)))[mask].astype(np.float64)
            row[f"{seq}_mean"] = float(values.mean())
            row[f"{seq}_sd"] = float(values.std())
        rows[pid] = row
    if not rows:
        raise SiteDataError(Path(site_dir) / "masks", "no valid case with a tumour mask", "add masks")
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "patient_id"
    return frame.sort_index()


def site_zscore(frame: pd.DataFrame) -> pd.DataFrame:
    """Each column centred and scaled by the site's own mean and sd (constant columns become 0)."""
    sd = frame.std(ddof=0).replace(0.0, 1.0)
    return (frame - frame.mean()) / sd


def write_signature_scores(site_dirs: Sequence[Path | str]) -> list[Path]:
    """Write ``derived/signature_scores.csv`` (site-z-scored tumour features) at every site."""
    out = []
    for site_dir in site_dirs:
        path = Path(site_dir) / "derived" / SIGNATURE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        site_zscore(tumour_features(site_dir)).to_csv(path)
        out.append(path)
    return out
