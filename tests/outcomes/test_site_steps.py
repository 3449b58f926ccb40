"""The outcomes site steps (client/steps/outcomes.py) on simulated sites, driven by the common drivers (no Flower)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.steps.outcomes import STEPS
from common.config import StudyConfig
from common.errors import PolicyError, ProtocolError, SiteDataError
from common.outcomes import KMeansOptions, run_kmeans
from common.outcomes_site import KMEANS_LABELS, KMEANS_MOMENTS, SURVIVAL_TABLE
from common.protocol import InMemoryQuery, Payload, Wire
from common.sitedata import Site
from common.survival import merge_survival_tables
from common.validation import load_site
from tests.outcomes.conftest import set_policy

STUDY = StudyConfig(phases=("outcomes",))


def _step(action: str, site: Site, payload: Payload) -> Payload:
    return STEPS[action].run(site, STUDY, payload)


def _site_query(sites: list[Site], wire: Wire | None = None) -> InMemoryQuery:
    """The client's site steps over loaded sites, as the ClientApp runs them (without the policy gate)."""
    steps = {action: (lambda site, payload, _a=action: _step(_a, site, payload)) for action in STEPS}
    return InMemoryQuery({s.site_id: s for s in sites}, steps, wire=wire)


def _cluster(sites: list[Site]) -> dict:
    """The server's k-means rounds (:func:`run_kmeans`) over the site steps; the sites' label-round replies."""
    final: dict = {}

    def wire(direction: str, action: str, site: str, payload: Payload) -> Payload:
        if direction == "reply" and action == KMEANS_LABELS:
            final[site] = payload
        return payload

    run_kmeans(_site_query(sites, wire), KMeansOptions(k=2, init="kmeans++", seed=3, tol=1e-6))
    return final


def test_kmeans_keeps_labels_at_the_site_and_replies_only_aggregates(signature_sites: list[Path]) -> None:
    sites = [load_site(p) for p in signature_sites]
    reply = _step(KMEANS_MOMENTS, sites[0], {})
    assert reply["n"] == 12 and reply["source"] == "signature_scores.csv" and reply["exact_outcomes"] is False
    assert reply["features"] == ["log_volume_ml", "T2w_mean", "T2w_sd", "CET1_mean", "CET1_sd"]
    assert {k for k, v in reply.items() if isinstance(v, np.ndarray)} == {"mean", "m2"}
    final = _cluster(sites)
    for site, path in zip(sites, signature_sites, strict=True):
        labels = pd.read_csv(path / "derived" / "clusters.csv", dtype={"patient_id": str})
        assert len(labels) == len(site.cases) and set(labels["cluster"]) <= {0, 1}
        # the labels themselves never leave; under the default policy's release ledger the inertia only
        # when the final partition may be released
        assert set(final[site.site_id]) in ({"n", "inertia"}, {"n", "held"})


def test_survival_table_binned_and_suppressed_by_policy(signature_sites: list[Path]) -> None:
    set_policy(signature_sites[0], min_cohort=4)
    sites = [load_site(p) for p in signature_sites]
    _cluster(sites)
    payload = {"mode": "binned", "time_bin_days": 28.0}  # asked; the site answers on its own 7-day grid
    replies = {s.site_id: _step(SURVIVAL_TABLE, s, payload) for s in sites}
    for site in sites:
        reply = replies[site.site_id]
        times = np.asarray(reply["times"])
        assert np.allclose(times / 7.0, np.round(times / 7.0))
        removed = np.asarray(reply["removed"])
        m = site.config.policy.min_cohort
        assert np.all((removed == 0) | (removed >= m)), site.site_id
        assert reply["min_cell"] == m
    table = merge_survival_tables(replies)
    clinical = pd.concat([s.clinical_frame() for s in sites])
    suppressed = sum(len(r["suppressed_groups"]) for r in replies.values())
    assert table.n.sum() <= len(clinical) and (suppressed > 0 or table.n.sum() == len(clinical))
    with pytest.raises(PolicyError, match="exact_outcomes"):
        _step(SURVIVAL_TABLE, sites[1], {"mode": "exact"})
    set_policy(signature_sites[1], exact_outcomes=True)
    exact = _step(SURVIVAL_TABLE, load_site(signature_sites[1]), {"mode": "exact"})
    os_days = set(sites[1].clinical_frame()["os_days"].astype(float))
    assert set(np.asarray(exact["times"]).tolist()) == os_days and exact["min_cell"] == 1


def test_site_errors_name_the_site_and_the_file(signature_sites: list[Path]) -> None:
    set_policy(signature_sites[0], exact_outcomes=True)  # its labels are then the final ones (no release ledger)
    site = load_site(signature_sites[0])
    with pytest.raises(SiteDataError, match="clusters.csv"):
        _step(SURVIVAL_TABLE, site, {"mode": "binned", "time_bin_days": 7.0})
    _cluster([load_site(p) for p in signature_sites])
    clinical = pd.read_csv(signature_sites[0] / "clinical.csv")
    clinical.loc[2, "os_days"] = -5
    clinical.to_csv(signature_sites[0] / "clinical.csv", index=False)
    with pytest.raises(ProtocolError, match="site-001.*clinical.csv.*negative"):
        _step(SURVIVAL_TABLE, load_site(signature_sites[0]), {"mode": "binned", "time_bin_days": 7.0})
    (signature_sites[1] / "derived" / "signature_scores.csv").unlink()
    with pytest.raises(SiteDataError, match="signature_scores.csv"):
        _step(KMEANS_MOMENTS, load_site(signature_sites[1]), {})
