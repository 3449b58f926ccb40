"""No message of the harmonisation and reduction phases holds a per-patient row.

Every message is captured as it travels (through the message codec, :func:`common.protocol.round_trip`), for
1. two cohort sizes: every array's shape, and every list's length, are the same: nothing scales with n;
   every array axis is a number of features, batches or design columns;
2. a different cohort with the same aggregates (each site's patients replaced by a reflection that keeps
   every count, sum and crossproduct the protocols use) and a shuffled cohort: every message is the same;
3. no array holds any patient's feature row (raw, centred or standardised).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from common.combat_spec import CombatOptions
from common.harmonisation import run_harmonisation_in_memory
from common.protocol import round_trip
from common.reduction import ReductionSettings, run_reduction_in_memory
from simulations.synthetic_features import synthetic_feature_sites

P = 11
SCANNERS = [["A", "B"], ["A"], ["C"], ["B", "C"]]  # scanner A and B span sites: all five ComBat rounds run
OPTIONS = CombatOptions(batch="scanner", continuous=("age",))
SETTINGS = ReductionSettings(variance_threshold=0.0, correlation_threshold=0.9, n_factors=2)
MIN_COHORT = 5


def _recorder(log: list):
    def wire(direction: str, action: str, site: str, payload: dict) -> dict:
        travelled = round_trip(payload)
        log.append((direction, action, site, travelled))
        return travelled

    return wire


def _run(features, covariates) -> tuple[list, list, dict]:
    combat_log: list = []
    reduction_log: list = []
    harmonised, result = run_harmonisation_in_memory(features, covariates, OPTIONS, min_cohort=MIN_COHORT,
                                                     wire=_recorder(combat_log))
    run_reduction_in_memory(harmonised, SETTINGS, min_cohort=MIN_COHORT, wire=_recorder(reduction_log))
    return combat_log, reduction_log, {"harmonised": harmonised, "model": result.model}


def _shape(value: object) -> object:
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str)
    if isinstance(value, str):
        try:
            return ("json", _shape(json.loads(value)))
        except json.JSONDecodeError:
            return ("str",)
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return ("list", len(value))
    return (type(value).__name__,)


def _structure(log: list) -> list:
    return [(d, a, s, {k: _shape(v) for k, v in sorted(p.items())}) for d, a, s, p in log]


def test_message_shapes_do_not_depend_on_cohort_size() -> None:
    small = synthetic_feature_sites([12, 20, 14, 15], P, seed=1, scanners=SCANNERS)
    large = synthetic_feature_sites([37, 51, 26, 44], P, seed=1, scanners=SCANNERS)
    logs_small, logs_large = _run(*small), _run(*large)
    for a, b in zip(logs_small[:2], logs_large[:2], strict=True):
        assert _structure(a) == _structure(b)
    actions = {a for _, a, _, _ in logs_small[0] + logs_small[1]}
    assert actions == {"combat_summary", "combat_fit", "combat_var", "combat_batch", "combat_apply",
                       "featurestats", "signature_scores"}
    # every axis is a number of features, batches or design columns (or kept features / factors)
    n_batch, n_design = 3, 3 + 1
    kept = len(logs_small[2]["harmonised"]["site-01"].columns)
    allowed = {P, n_batch, n_design, kept, SETTINGS.n_factors}
    sizes = {12, 20, 14, 15, 37, 51, 26, 44, 6, 7, 8, 10, 13, 18, 19, 22, 25}
    for log in logs_small[:2] + logs_large[:2]:
        for _, _, _, payload in log:
            for key, value in payload.items():
                if isinstance(value, np.ndarray):
                    assert set(value.shape) <= allowed, (key, value.shape)
                    assert not set(value.shape) & sizes, (key, value.shape)
                elif isinstance(value, list):
                    assert len(value) in allowed, key


def _reflect_within_cells(features, covariates, seed: int):
    """Each site's patients replaced by H @ rows, H a Householder reflection per (site, scanner) cell that fixes
    the cell's design columns (ones, age): every count, sum, crossproduct and residual sum of squares stays."""
    rng = np.random.default_rng(seed)
    out = {}
    for site, table in features.items():
        new = table.copy()
        for _, idx in covariates[site].groupby("scanner").groups.items():
            design = np.column_stack([np.ones(len(idx)), covariates[site].loc[idx, "age"].to_numpy()])
            q, _ = np.linalg.qr(design)
            v = rng.normal(size=len(idx))
            v -= q @ (q.T @ v)
            v /= np.linalg.norm(v)
            reflect = np.eye(len(idx)) - 2.0 * np.outer(v, v)
            new.loc[idx] = reflect @ table.loc[idx].to_numpy()
        out[site] = new
    return out


def _assert_same_messages(a: list, b: list) -> None:
    assert _structure(a) == _structure(b)
    for (_, action, site, pa), (_, _, _, pb) in zip(a, b, strict=True):
        for key, va in pa.items():
            vb = pb[key]
            if isinstance(va, np.ndarray):
                scale = max(float(np.abs(va).max()), 1e-300)
                assert np.abs(va - vb).max() <= 1e-9 * scale, (action, site, key)
            elif isinstance(va, float):
                assert abs(va - vb) <= 1e-9 * max(abs(va), 1e-300), (action, site, key)
            elif key != "spec":
                assert va == vb, (action, site, key)
            else:  # the spec JSON holds no float computed from data
                assert json.loads(va) == json.loads(vb)


def test_messages_depend_on_patients_only_through_aggregates() -> None:
    features, covariates = synthetic_feature_sites([12, 20, 14, 15], P, seed=2, scanners=SCANNERS)
    reflected = _reflect_within_cells(features, covariates, seed=3)
    shuffled = {s: t.sample(frac=1.0, random_state=4) for s, t in features.items()}
    # the cohorts really differ patient by patient
    for site in features:
        assert np.abs(reflected[site].to_numpy() - features[site].to_numpy()).max(axis=1).min() > 0
    base = _run(features, covariates)
    for other in (_run(reflected, covariates), _run(shuffled, covariates)):
        _assert_same_messages(base[0], other[0])
        _assert_same_messages(base[1], other[1])
    # ...while each site's own result follows its own patients
    moved = _run(reflected, covariates)[2]["harmonised"]["site-02"]
    assert np.abs(moved.to_numpy() - base[2]["harmonised"]["site-02"].to_numpy()).max() > 1e-3


def test_no_message_holds_a_patient_row() -> None:
    features, covariates = synthetic_feature_sites([12, 20, 14, 15], P, seed=5, scanners=SCANNERS)
    combat_log, reduction_log, out = _run(features, covariates)
    model = out["model"]
    rows = []
    for site, table in features.items():
        y, s, _ = model.standardised(table, covariates[site])
        harmonised = out["harmonised"][site].to_numpy()
        rows += [y, y - y.mean(axis=0), s, harmonised, harmonised - harmonised.mean(axis=0)]
    patients = np.vstack(rows)
    scale = np.abs(patients).max(axis=0) + 1e-300
    for _, action, site, payload in combat_log + reduction_log:
        for key, value in payload.items():
            if not isinstance(value, np.ndarray) or P not in value.shape:
                continue
            axis = value.shape.index(P)
            vectors = np.moveaxis(value, axis, -1).reshape(-1, P)
            for vec in vectors:
                closest = (np.abs(patients - vec) / scale).max(axis=1).min()
                assert closest > 1e-6, f"{action} {site} {key} holds a patient row"
    assert len(pd.concat(out["harmonised"].values())) == sum(len(t) for t in features.values())
