"""The features phase: the server's check of the sites' replies, and the phase through Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from client.features.table import extract_cases, feature_provenance, read_feature_table
from common.config import load_study_config
from common.errors import ProtocolError
from common.features.protocol import summarise_feature_replies
from common.features.settings import load_radiomics_settings, settings_hash
from common.validation import load_site


def _reply(n: int, h: str = "a" * 64, k: int = 214, failed: int = 0) -> dict:
    return {"n_cases": n, "n_features": k, "n_failed": failed, "settings_hash": h}


def test_summary_merges_counts_and_rejects_mixed_settings() -> None:
    out = summarise_feature_replies({"s2": _reply(7, failed=1), "s1": _reply(5)})
    assert out == {"settings_hash": "a" * 64, "n_features": 214, "n_cases": 12, "cases_per_site": {"s1": 5, "s2": 7},
                   "failed_per_site": {"s1": 0, "s2": 1}}
    with pytest.raises(ProtocolError, match="'s2'.*settings hash"):
        summarise_feature_replies({"s1": _reply(5), "s2": _reply(5, h="b" * 64)})
    with pytest.raises(ProtocolError, match="different numbers of features"):
        summarise_feature_replies({"s1": _reply(5), "s2": _reply(5, k=213)})
    with pytest.raises(ProtocolError, match="lacks"):
        summarise_feature_replies({"s1": {"n_cases": 5}})


@pytest.mark.slow
def test_features_phase_through_flower_simulation(writable_sites: list[Path], tmp_path: Path) -> None:
    from simulations.engine import run_simulated_study

    study_path = tmp_path / "study.yaml"
    study_path.write_text("name: features-test\nphases: [fingerprint, features]\nmin_sites: 3\n"
                          "round_timeout_s: 300\nfeatures: {settings: default, workers: 1}\n")
    study = load_study_config(study_path)
    summary = run_simulated_study(study, study_path, writable_sites, tmp_path / "out")
    spacing = summary["outputs"]["fingerprint"]["target_spacing"]
    out = summary["outputs"]["features"]
    assert out["cases_per_site"] == {"site-001": 6, "site-002": 6, "site-003": 6}
    assert summary["participants"]["features"] == out["cases_per_site"]
    settings = load_radiomics_settings()
    expected_hash = settings_hash(settings.resolve(study.sequences, spacing))
    assert out["settings_hash"] == expected_hash and out["target_spacing"] == pytest.approx(spacing)
    assert (tmp_path / "out" / "radiomics_settings.json").is_file()
    for site_dir in writable_sites:
        assert feature_provenance(site_dir / "derived" / "features.csv")["settings_hash"] == expected_hash
    # what the phase left at a site equals the same extraction run without Flower, on the plan's grid
    site = load_site(writable_sites[1])
    direct = extract_cases(site.cases, study.sequences, settings, spacing, workers=1)
    pd.testing.assert_frame_equal(read_feature_table(site.root / "derived" / "features.csv"), direct.frame,
                                  check_exact=True)
