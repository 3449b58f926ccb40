"""The federated image classifier on tumour crops, and Grad-CAM over its input.

Machine independence: the phantoms and the initial weights are seeded, torch runs one thread with
deterministic algorithms, and no assertion needs the exact floats of a kernel. A different CPU (its SIMD
kernels, its BLAS) still trains a slightly different model, so every bound below leaves a margin measured
over data and initialisation seeds and over other float kernels (see WORST_MEASURED). The model is first
checked to have learnt the subtype, then its Grad-CAM to localise the tumour by margins that a map peaking at
random (chance) or a flipped map would miss.

The Grad-CAM maps used to be flipped: MONAI's default post-processing maps (min, max) to (1, 0), so the
"peak" was the least relevant voxel; at ``layer3`` (a 3^3 map for 12^3 crops) that minimum landed in the
tumour by chance on some machines and not on others. The maps now keep their orientation
(:func:`client.classifier.explain.grad_cam`) and are taken at ``layer1``, the full-resolution block.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

CROP = 12
PATIENTS, TRAIN = 24, 8  # per site: 8 training crops, 16 held out; Grad-CAM over all 72 crops
MIN_ACCURACY = 0.75  # of the trained model on every crop it explains (chance 0.5)
HIT_FACTOR = 1.5  # Grad-CAM peaks in the tumour at least 1.5 x as often as a random peak would ...
MAX_P = 0.01  # ... and the binomial test against chance says so at p < 0.01
MASS_FACTOR = 1.1  # the maps hold at least 1.1 x the tumour's share of the crop in the tumour
WORST_MEASURED = {"accuracy": 0.847, "held_out_auc": 0.986, "hit_ratio": 2.25, "p": 3.4e-4, "mass_ratio": 1.30}
"""The worst of 20 trained models: data and initialisation seeds 0-4, each trained with torch's AVX2 kernels,
its plain C++ kernels (``ATEN_CPU_CAPABILITY=default``), without oneDNN convolutions
(``torch.backends.mkldnn.enabled = False``) and on 2 threads -- stand-ins for another machine's float kernels.
Peaks in the tumour ranged over 2.25-7.8 x chance (seed 0, the test's: 2.25-4.05 x), mass 1.30-4.6 x; the
flipped maps peaked in the tumour 0-2 times in 72 (chance about 8), mass at most 0.97 x chance. Before the
fix (flipped maps at layer3, 3 x 10 phantoms, 30 crops) seeds 0-4 gave 8, 5, 0, 9, 0 peaks in the tumour
against chance 0.10-0.13."""


@pytest.fixture(scope="module")
def deterministic_torch() -> Iterator[None]:
    """One CPU thread and deterministic algorithms for this module; the previous settings afterwards."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, deterministic_torch: None) -> dict:
    """3 phantom sites x 24 patients (32^3; the two subtypes differ inside the tumour), trained by FedAvg."""
    from client.classifier.data import site_labels, tumour_crops
    from client.classifier.memory import CLASSIFIER_STEPS, SiteArrays, memory_sites
    from common.classifier.protocol import run_classifier
    from common.config import ClassifierConfig
    from common.protocol import InMemoryQuery
    from common.validation import load_site
    from simulations.phantoms import simulate_sites

    root = tmp_path_factory.mktemp("gradcam")
    dirs = simulate_sites(root / "sites", sites=3, patients=PATIENTS, size=32, seed=0)
    sites, crops, masks, labels = {}, [], [], []
    for d in dirs:
        s = load_site(d)
        c, m = tumour_crops(s.cases, ("T2w", "CET1"), CROP)
        y = site_labels(s, "label").to_numpy()
        sites[s.site_id] = SiteArrays(c[:TRAIN], y[:TRAIN], c[TRAIN:], y[TRAIN:],
                                      [x.patient_id for x in s.cases[TRAIN:]], masks_test=m[TRAIN:])
        crops.append(c)
        masks.append(m)
        labels.append(y)
    cfg = ClassifierConfig(models=("image",), image_rounds=10, image_local_steps=8, image_lr=3e-3, crop_size=CROP,
                           bootstrap=20, gradcam_layer="layer1", gradcam_overlays=2, threads=1, seed=0)
    query = InMemoryQuery(memory_sites(sites, cfg, min_cohort=3, overlay_dir=root / "overlays"), CLASSIFIER_STEPS)
    run = run_classifier(query, "image", cfg)
    return {"run": run, "cfg": cfg, "crops": np.concatenate(crops), "masks": np.concatenate(masks),
            "labels": np.concatenate(labels), "root": root}


def _net(trained: dict) -> object:
    from common.classifier.models import build_image_model, load_weights

    net = build_image_model(2, trained["cfg"].image_channels)
    load_weights(net, trained["run"].weights)
    return net


def _localises(maps: np.ndarray, masks: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Whether maps peak in the tumour and hold mass there by the margins above, and the figures."""
    from scipy.stats import binomtest

    from client.classifier.explain import cam_in_tumour

    stats = cam_in_tumour(maps, masks)
    n = len(maps)
    chance = float(stats["tumour_share"].mean())  # a random peak lands in the tumour this often
    hits = int(stats["peak_in_tumour"].sum())
    mass = float(stats["mass_in_tumour"].mean())
    p = float(binomtest(hits, n, chance, alternative="greater").pvalue)
    ok = hits / n >= HIT_FACTOR * chance and p < MAX_P and mass >= MASS_FACTOR * chance
    return ok, {"hits": hits, "n": n, "chance": chance, "mass": mass, "p": p}


def test_image_classifier_learns_the_subtype(trained: dict) -> None:
    """The model's exact held-out AUC (scored here, where the crops are) and the federation's released one. The
    released AUC comes from the sites' score cells of >= min_cell held-out cases (merged where smaller), so it is
    coarser and swings with where scores near 0.5 fall (0.74 on one machine for an exact 0.99): only its being
    above chance is asserted."""
    from sklearn.metrics import roc_auc_score

    from common.classifier.models import image_scores

    held = np.concatenate([np.arange(k * PATIENTS + TRAIN, (k + 1) * PATIENTS) for k in range(3)])
    scores = image_scores(_net(trained), trained["crops"][held])
    assert roc_auc_score(trained["labels"][held], scores) >= 0.9  # worst measured 0.986
    pooled = trained["run"].summary["pooled"]
    assert pooled["auc"] > 0.5, pooled


def test_gradcam_maps_have_input_shape_and_peak_in_tumour_above_chance(trained: dict) -> None:
    from client.classifier.explain import grad_cam
    from common.classifier.models import image_scores

    cfg, crops, masks, labels = trained["cfg"], trained["crops"], trained["masks"], trained["labels"]
    net = _net(trained)
    accuracy = float(np.mean((image_scores(net, crops) >= 0.5) == labels))
    assert accuracy >= MIN_ACCURACY, accuracy  # a model that has not learnt the subtype explains nothing
    maps = grad_cam(net, crops, cfg.gradcam_layer)
    assert maps.shape == (len(crops),) + crops.shape[2:] == (len(crops), CROP, CROP, CROP)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    ok, figures = _localises(maps, masks)
    assert ok, figures
    # the same criterion rejects what a broken Grad-CAM gives: the flipped map (MONAI's default scaling)
    flipped = np.stack([1.0 - m if m.max() > 0 else m for m in maps])
    assert not _localises(flipped, masks)[0]


def test_gradcam_keeps_the_map_orientation(deterministic_torch: None) -> None:
    """A model whose evidence is the input itself: its Grad-CAM peaks at the brightest voxel (value 1)."""
    import torch

    from client.classifier.explain import grad_cam, unit_range

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1),
                              torch.nn.Flatten(), torch.nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[4].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        net[4].bias.zero_()
    x = np.full((1, 1, 6, 6, 6), 0.1, dtype=np.float32)
    x[0, 0, 4, 1, 2] = 2.0
    x[0, 0, 0, 0, 0] = 0.0
    maps = grad_cam(net, x, "1")
    assert np.unravel_index(maps[0].argmax(), maps[0].shape) == (4, 1, 2)
    assert maps[0, 4, 1, 2] == pytest.approx(1.0) and maps[0, 0, 0, 0] == pytest.approx(0.0)
    np.testing.assert_allclose(unit_range(np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])),
                               [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])


def test_gradcam_summary_and_overlays_stay_at_the_site(trained: dict) -> None:
    summary = trained["run"].summary
    assert summary["gradcam"]["n"] == sum(int(m["n"]) for m in summary["per_site"].values())
    assert 0.0 < summary["gradcam"]["chance"] < 0.5
    pngs = sorted((trained["root"] / "overlays").glob("site-*/*.png"))
    assert len(pngs) == 3 * trained["cfg"].gradcam_overlays
