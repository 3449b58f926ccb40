"""Site steps of the classifier phase: data from the site's folder in, aggregates out.

* ``query.classifier_nyul``: the site's mean Nyúl landmarks (only when ``classifier.standardise: nyul``);
* ``query.classifier_moments``: count, mean, sum of squares and centred crossproduct of the training features
  (for the pooled scaling and the step size), and their names;
* ``train.classifier`` (:func:`train_step`): one FedAvg round of local steps on the training cases;
* ``evaluate.classifier`` (:func:`evaluate_step`): the held-out aggregates (histograms, bootstrap replicates,
  SHAP sums, Grad-CAM statistics), plus the site's scanner vendor and field strength for the fairness report.

The driver is :func:`common.classifier.protocol.run_classifier`; the replies come from the same functions
as the in-memory sites' (:mod:`client.classifier.site`). The ClientApp sends ``train.classifier`` and
``evaluate.classifier`` as Flower train / evaluate messages. A private round is charged to the site's lifetime
privacy ledger ``derived/privacy-ledger.json`` (:mod:`client.privacy_ledger`), shared by every model, study and
phase, so the site's policy's ``max_epsilon`` bounds the total; the epsilon a site reports is what the study has
spent there (all its models), at the site's ``max_delta``. Each model's accountant state (its fixed noise
multiplier) is ``derived/classifier/dp-state-<study hash>-<model>.json``; both survive a SuperNode restart. Every
step runs over the cases with a tumour mask (:func:`with_tumour`) of the study's imaging inputs
(:mod:`client.steps.inputs`: the preprocessed cases on the plan's grid when the study preprocesses, else raw).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from client.classifier.data import SplitData, site_split, tumour_crops
from client.classifier.features import site_feature_table, standardised_images
from client.classifier.site import evaluate_reply, local_settings, train_reply
from client.privacy_ledger import SiteBudget
from client.steps.base import SiteStep, release_ledger, work_dir
from client.steps.inputs import (
    ImagingInputs,
    check_feature_inputs,
    inputs_plan_sha256,
    load_imaging_inputs,
    raw_inputs,
)
from client.training.dp import check_training_policy, read_ledger, write_ledger
from common.classifier.protocol import EVALUATE, MOMENTS, NYUL, TRAIN
from common.classifier.training import site_feature_moments
from common.config import StudyConfig
from common.errors import ProtocolError
from common.nyul import case_landmarks, site_nyul
from common.protocol import Payload
from common.release_ledger import CLASSIFIER_SPLIT
from common.sitedata import Site

log = logging.getLogger(__name__)
PHASE = "classifier"


def classifier_dir(site: Site) -> Path:
    """The site's folder for the classifier's local files (feature cache, DP state, Grad-CAM overlays)."""
    path = work_dir(site) / "classifier"
    path.mkdir(parents=True, exist_ok=True)
    return path


def feature_frame(site: Site, study: StudyConfig, nyul: Mapping | None = None) -> pd.DataFrame:
    """The site's feature table for the study's classifier (see :mod:`client.classifier.features`)."""
    cfg = study.classifier
    # the compact features' images and masks: this study's inputs (its plan) and its inference phase's masks
    inputs = f"{inputs_plan_sha256(site, study) or 'raw'}:{study.hash}"
    if cfg.standardise == "nyul" and cfg.features != "table":
        from client.classifier.features import compact_features, compact_settings_hash

        if not nyul:
            raise ProtocolError(site.site_id, "Nyúl standardisation without the federated standard scale",
                                "run the classifier phase, which learns it first")
        key = compact_settings_hash(study.intensity_sequences, "nyul", nyul, inputs=inputs)[:16]
        cache = classifier_dir(site) / f"compact-{key}.csv"
        if cache.is_file():
            frame = pd.read_csv(cache, dtype={"patient_id": str}).set_index("patient_id")
        else:
            frame = compact_features(site.cases, study.intensity_sequences, "nyul", nyul)
            frame.to_csv(cache)
        return frame.loc[[c.patient_id for c in site.cases]]
    tables = (study.harmonisation.output_file, study.harmonisation.features_file)
    if cfg.features != "compact":
        check_feature_inputs(site, study)
    return site_feature_table(site, cfg.features, tables, study.intensity_sequences, cfg.standardise,
                              classifier_dir(site), inputs)


def feature_source(site: Site, study: StudyConfig) -> str:
    """Which features the site's classifier reads: a table name under ``derived/``, or ``compact``."""
    cfg = study.classifier
    if cfg.features == "compact" or (cfg.standardise == "nyul" and cfg.features != "table"):
        return "compact"
    tables = (study.harmonisation.output_file, study.harmonisation.features_file)
    found = next((t for t in tables if (site.root / "derived" / t).is_file()), None)
    return found or ("compact" if cfg.features == "auto" else tables[0])


def released_split(site: Site, study: StudyConfig) -> SplitData:
    """The study's train / held-out split, held to the site's release ledger: a server that changes the split's
    seed or fraction between studies must change it by at least ``min_cell`` patients, or the aggregates over
    the two training sets (moments, gradients, scores) would differ by a few patients' values."""
    split = site_split(site, study)
    ledger = release_ledger(site)
    if ledger is not None:
        ids = [*split.train, *split.test]
        ledger.release(CLASSIFIER_SPLIT, ids, [list(split.train)], study.hash, count=False)  # fixed by the study
    return split


def nyul_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """The site's mean Nyúl landmarks over its training cases' foregrounds (common.nyul.site_nyul)."""
    from client.preprocessing.foreground import foreground_mask, values_in

    split = released_split(site, study)
    train = set(split.train)
    p = study.preprocessing.normalise
    per_case = []
    for case in site.cases:
        if case.patient_id not in train:
            continue
        imgs = standardised_images(case, study.intensity_sequences, "none")
        fg = foreground_mask(imgs[study.reference_sequence], case.patient_id)
        per_case.append({seq: case_landmarks(values_in(img, fg), p.nyul_percentiles) for seq, img in imgs.items()})
    return site_nyul(site.site_id, per_case, study.intensity_sequences, p.nyul_percentiles, p.nyul_scale,
                     site.config.policy.min_cohort)


def moments_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """Moments of the training features (exactly mergeable), and the feature names in column order."""
    split = released_split(site, study)
    frame = feature_frame(site, study, _nyul(payload))
    x = frame.loc[split.train].to_numpy(np.float64)
    reply = site_feature_moments(site.site_id, x, [str(c) for c in frame.columns], site.config.policy.min_cohort)
    reply["feature_source"] = feature_source(site, study)
    return reply


def _nyul(payload: Payload) -> dict | None:
    """The federated Nyúl standard scale the server sends as JSON (None when not used)."""
    text = payload.get("nyul_json")
    return json.loads(str(text)) if text else None


def _inputs(site: Site, study: StudyConfig, payload: Payload, split: SplitData, part: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """(inputs, labels, crop masks or None, case ids) of the training or held-out part; features raw, in the
    server's column order (:func:`client.classifier.site.model_inputs` scales them)."""
    ids = split.train if part == "train" else split.test
    y = split.labels.loc[ids].to_numpy()
    kind = str(payload["model"])
    if kind == "image":
        by_id = {c.patient_id: c for c in site.cases}  # with_tumour: unlabelled ones carry the federated model's mask
        crops, masks = tumour_crops([by_id[i] for i in ids], study.intensity_sequences, study.classifier.crop_size)
        return crops, y, masks, ids
    names = [str(n) for n in cast(list, payload["feature_names"])]
    frame = feature_frame(site, study, _nyul(payload))
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ProtocolError(site.site_id, f"the site has no feature(s) {missing[:3]}",
                            "use the same feature table layout at every site")
    return frame.loc[ids, names].to_numpy(np.float64), y, None, ids


def _dp_state_path(site: Site, study: StudyConfig, model: str) -> Path:
    """The DP accountant state of one model of the study at the site (its fixed noise multiplier and history);
    what the site has spent over every model, study and phase is its lifetime ledger (:mod:`client.privacy_ledger`)."""
    if model not in ("logistic", "mlp", "image"):
        raise ProtocolError(site.site_id, f"unknown classifier model {model[:32]!r}", "use logistic, mlp or image")
    return classifier_dir(site) / f"dp-state-{study.hash[:16]}-{model}.json"


def train_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """One round of local training from the global weights; the reply holds weights and counts only.

    The study's training settings are held to the site's policy before any feature or crop is computed, and a
    private round is charged to the site's lifetime privacy ledger (refused past ``max_epsilon``).
    """
    policy = site.config.policy
    split = released_split(site, study)
    kind = str(payload["model"])
    cfg = study.classifier
    state_path = _dp_state_path(site, study, kind)
    check_training_policy(site.site_id, policy, cfg.dp, batch_size=local_settings(kind, cfg, 0).batch_size,
                          n_train=len(split.train), what=f"classifier training ({kind})")
    budget = SiteBudget(site.site_id, site.root, policy, study.hash, "classifier", kind, cfg.dp.accountant)
    x, y, _, _ = _inputs(site, study, payload, split, "train")
    dp_state = read_ledger(state_path) if cfg.dp.enabled else None
    reply, dp_state = train_reply(site.site_id, payload, x, y, cfg, min_cohort=policy.min_cohort,
                                  max_epsilon=policy.max_epsilon, dp_state=dp_state, study_hash=study.hash,
                                  budget=budget)
    if dp_state is not None and cfg.dp.enabled:
        write_ledger(state_path, dp_state)
    return reply


def evaluate_step(site: Site, study: StudyConfig, payload: Payload) -> Payload:
    """The held-out aggregates of the global model (and Grad-CAM overlays written at the site)."""
    split = released_split(site, study)
    x, y, masks, ids = _inputs(site, study, payload, split, "test")
    kind = str(payload["model"])
    strata = {a: [str(v) for v in split.clinical.loc[ids, a]] for a in study.classifier.fairness_attributes
              if a in split.clinical.columns}
    overlay = classifier_dir(site) / f"gradcam-{study.hash[:12]}" if kind == "image" else None
    reply = evaluate_reply(site.site_id, payload, x, y, study.classifier, min_cohort=site.config.policy.min_cohort,
                           strata=strata, masks=masks, overlay_dir=overlay, case_ids=ids, policy=site.config.policy)
    reply["vendor"] = site.config.require_scanner().vendor
    reply["field_strength"] = f"{site.config.require_scanner().field_strength:g}T"
    return reply


def with_tumour(site: Site | ImagingInputs) -> Site:
    """The input cases (a site: its raw ones) restricted to those with a tumour mask (a radiologist's, or the
    federated model's from the inference phase) and with features: a case the model found no tumour in, or whose
    radiomics failed (e.g. a one-voxel prediction), takes no part."""
    inputs = raw_inputs(site) if isinstance(site, Site) else site
    site = inputs.site
    failed: set[str] = set()
    info = work_dir(site) / "features.json"  # written by the features phase, with the cases it could not extract
    if info.is_file():
        failed = set(json.loads(info.read_text(encoding="utf-8")).get("failures", {}))
    cases = tuple(c for c in inputs.with_predicted_masks() if c.mask is not None and c.patient_id not in failed)
    if len(cases) < len(site.cases):
        log.info("site %s: classifier over %d of %d case(s) (the others have no tumour mask)", site.site_id,
                 len(cases), len(site.cases))
    return replace(site, cases=cases)


def _on_cases_with_tumour(step: Callable[[Site, StudyConfig, Payload], Payload]
                          ) -> Callable[[Site, StudyConfig, Payload], Payload]:
    def run(site: Site, study: StudyConfig, payload: Payload) -> Payload:
        return step(with_tumour(load_imaging_inputs(site, study)), study, payload)

    return run


def _n_labelled(site: Site) -> int:
    return len(with_tumour(site).cases)


STEPS: dict[str, SiteStep] = {
    NYUL: SiteStep(PHASE, _on_cases_with_tumour(nyul_step), _n_labelled),
    MOMENTS: SiteStep(PHASE, _on_cases_with_tumour(moments_step), _n_labelled),
    TRAIN: SiteStep(PHASE, _on_cases_with_tumour(train_step), _n_labelled),
    EVALUATE: SiteStep(PHASE, _on_cases_with_tumour(evaluate_step), _n_labelled),
}
