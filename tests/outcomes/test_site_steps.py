"""The outcomes site steps (client/steps/outcomes.py) on simulated sites, without Flower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.steps.outcomes import kmeans_step, survival_step
from common.config import StudyConfig
from common.errors import PolicyError, ProtocolError, SiteDataError
from common.kmeans import LloydLoop, random_centres
from common.pooled_moments import merge_moments
from common.survival import merge_survival_tables
from common.validation import load_site
from tests.outcomes.conftest import set_policy

STUDY = StudyConfig(phases=("outcomes",))


def _cluster(sites: list) -> dict:
    """The server's k-means rounds, driven by hand over the site steps."""
    first = {s.site_id: kmeans_step(s, STUDY, {"op": "moments"}) for s in sites}
    moments = merge_moments(first)
    base = {"mean": moments.mean, "scale": moments.std()}
    loop = LloydLoop(random_centres(2, np.zeros(len(moments.mean)), np.ones(len(moments.mean)), 3), tol=1e-6)
    while not loop.update({s.site_id: kmeans_step(s, STUDY, {**base, "op": "assign", **loop.request()})
                           for s in sites}):
        pass
    return {s.site_id: kmeans_step(s, STUDY, {**base, "op": "labels", "centres": loop.centres}) for s in sites}


def test_kmeans_keeps_labels_at_the_site_and_replies_only_aggregates(signature_sites: list[Path]) -> None:
    sites = [load_site(p) for p in signature_sites]
    reply = kmeans_step(sites[0], STUDY, {"op": "moments"})
    assert reply["n"] == 12 and reply["source"] == "signature_scores.csv" and reply["exact_outcomes"] is False
    assert reply["features"] == ["log_volume_ml", "T2w_mean", "T2w_sd", "CET1_mean", "CET1_sd"]
    assert {k for k, v in reply.items() if isinstance(v, np.ndarray)} == {"mean", "m2"}
    final = _cluster(sites)
    for site, path in zip(sites, signature_sites, strict=True):
        labels = pd.read_csv(path / "derived" / "clusters.csv", dtype={"patient_id": str})
        assert len(labels) == len(site.cases) and set(labels["cluster"]) <= {0, 1}
        assert set(final[site.site_id]) == {"n", "inertia"}  # the labels themselves never leave


def test_survival_table_binned_and_suppressed_by_policy(signature_sites: list[Path]) -> None:
    set_policy(signature_sites[0], min_cohort=4)
    sites = [load_site(p) for p in signature_sites]
    _cluster(sites)
    payload = {"op": "table", "mode": "binned", "time_bin_days": 30.0}
    replies = {s.site_id: survival_step(s, STUDY, payload) for s in sites}
    for site in sites:
        reply = replies[site.site_id]
        times = np.asarray(reply["times"])
        assert np.allclose(times / 30.0, np.round(times / 30.0))
        removed = np.asarray(reply["removed"])
        m = site.config.policy.min_cohort
        assert np.all((removed == 0) | (removed >= m)), site.site_id
        assert reply["min_cell"] == m
    table = merge_survival_tables(replies)
    clinical = pd.concat([s.clinical_frame() for s in sites])
    suppressed = sum(len(r["suppressed_groups"]) for r in replies.values())
    assert table.n.sum() <= len(clinical) and (suppressed > 0 or table.n.sum() == len(clinical))
    with pytest.raises(PolicyError, match="exact_outcomes"):
        survival_step(sites[1], STUDY, {"op": "table", "mode": "exact"})
    set_policy(signature_sites[1], exact_outcomes=True)
    exact = survival_step(load_site(signature_sites[1]), STUDY, {"op": "table", "mode": "exact"})
    os_days = set(sites[1].clinical_frame()["os_days"].astype(float))
    assert set(np.asarray(exact["times"]).tolist()) == os_days and exact["min_cell"] == 1


def test_site_errors_name_the_site_and_the_file(signature_sites: list[Path]) -> None:
    site = load_site(signature_sites[0])
    with pytest.raises(SiteDataError, match="clusters.csv"):
        survival_step(site, STUDY, {"op": "table", "mode": "binned", "time_bin_days": 7.0})
    _cluster([load_site(p) for p in signature_sites])
    clinical = pd.read_csv(signature_sites[0] / "clinical.csv")
    clinical.loc[2, "os_days"] = -5
    clinical.to_csv(signature_sites[0] / "clinical.csv", index=False)
    with pytest.raises(ProtocolError, match="site-001.*clinical.csv.*negative"):
        survival_step(load_site(signature_sites[0]), STUDY, {"op": "table", "mode": "binned", "time_bin_days": 7.0})
    (signature_sites[1] / "derived" / "signature_scores.csv").unlink()
    with pytest.raises(SiteDataError, match="signature_scores.csv"):
        kmeans_step(load_site(signature_sites[1]), STUDY, {"op": "moments"})
