"""The federated image classifier on tumour crops, and Grad-CAM over its input."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ClassifierConfig

CROP = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 phantom sites x 10 patients (32^3; the two subtypes differ inside the tumour), trained by FedAvg."""
    from client.training.classifier_data import site_labels, tumour_crops
    from common.validation import load_site
    from simulations.inprocess_classifier import SiteArrays, federated_classifier
    from simulations.phantoms import simulate_sites

    root = tmp_path_factory.mktemp("gradcam")
    dirs = simulate_sites(root / "sites", sites=3, patients=10, size=32, seed=0)
    sites, crops, masks = {}, [], []
    for d in dirs:
        s = load_site(d)
        c, m = tumour_crops(s.cases, ("T2w", "CET1"), CROP)
        y = site_labels(s, "label").to_numpy()
        sites[s.site_id] = SiteArrays(c[:6], y[:6], c[6:], y[6:], [x.patient_id for x in s.cases[6:]],
                                      masks_test=m[6:])
        crops.append(c)
        masks.append(m)
    cfg = ClassifierConfig(models=("image",), image_rounds=10, image_local_steps=8, image_lr=3e-3, crop_size=CROP,
                           bootstrap=20, gradcam_layer="layer3", gradcam_overlays=2)
    run = federated_classifier(sites, "image", cfg, min_cohort=3, overlay_dir=root / "overlays")
    return {"run": run, "cfg": cfg, "crops": np.concatenate(crops), "masks": np.concatenate(masks), "root": root}


def test_image_classifier_learns_the_subtype(trained: dict) -> None:
    pooled = trained["run"].summary["pooled"]
    assert pooled["auc"] >= 0.8, pooled


def test_gradcam_maps_have_input_shape_and_peak_in_tumour_above_chance(trained: dict) -> None:
    from scipy.stats import binomtest

    from client.training.classifier_explain import cam_in_tumour, grad_cam
    from client.training.classifier_models import build_image_model, load_weights

    cfg, crops, masks = trained["cfg"], trained["crops"], trained["masks"]
    net = build_image_model(2, cfg.image_channels)
    load_weights(net, trained["run"].weights)
    maps = grad_cam(net, crops, cfg.gradcam_layer)
    assert maps.shape == (len(crops),) + crops.shape[2:] == (len(crops), CROP, CROP, CROP)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    stats = cam_in_tumour(maps, masks)
    chance = float(stats["tumour_share"].mean())  # a random peak lands in the tumour this often
    hits = int(stats["peak_in_tumour"].sum())
    assert hits / len(crops) > chance
    assert binomtest(hits, len(crops), chance, alternative="greater").pvalue < 0.05, (hits, len(crops), chance)


def test_gradcam_summary_and_overlays_stay_at_the_site(trained: dict) -> None:
    summary = trained["run"].summary
    assert summary["gradcam"]["n"] == sum(int(m["n"]) for m in summary["per_site"].values())
    assert 0.0 < summary["gradcam"]["chance"] < 0.5
    pngs = sorted((trained["root"] / "overlays").glob("site-*/*.png"))
    assert len(pngs) == 3 * trained["cfg"].gradcam_overlays
