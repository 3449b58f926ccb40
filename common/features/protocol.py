"""The features protocol: the sites' feature-table counts, checked to come from one settings hash.

Feature tables never leave the sites; each site replies with counts and the sha256 of the radiomics settings it
resolved. Tables are comparable across sites (and usable by harmonisation and reduction) only when every site
used the same settings, so a site with another hash is an error, not a warning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import ProtocolError
from common.features.settings import RadiomicsSettings
from common.protocol import Payload, Query
from common.replies import read_count

FEATURES = "features"  # the one round: each site extracts and keeps its table, and answers counts
SETTINGS_KEY = "radiomics_settings"  # payload: the settings as JSON (the server's copy wins over the site's)
SPACING_KEY = "target_spacing"  # payload: the plan's target spacing (x, y, z mm)
REPLY_FIELDS: tuple[str, ...] = ("n_cases", "n_features", "n_failed", "settings_hash")


def summarise_feature_replies(replies: Mapping[str, Mapping[str, object]]) -> dict:
    """Counts per site and the one settings hash; raises :class:`ProtocolError` on a missing field or a mismatch."""
    if not replies:
        raise ProtocolError("(none)", "no site answered the features query")
    for site, reply in replies.items():
        missing = [f for f in REPLY_FIELDS if f not in reply]
        if missing:
            raise ProtocolError(site, f"features reply lacks {missing}", "run the same fedbiopsy version at every site")
    sites = sorted(replies)
    hashes = {s: str(replies[s]["settings_hash"]) for s in sites}
    reference = hashes[sites[0]]
    odd = [s for s in sites if hashes[s] != reference]
    if odd:
        raise ProtocolError(odd[0], f"radiomics settings hash {hashes[odd[0]][:12]} differs from {sites[0]}'s "
                            f"{reference[:12]}", "send one study config and one settings file to all sites")
    n_features = {s: int(replies[s]["n_features"]) for s in sites}  # type: ignore[call-overload]
    if len(set(n_features.values())) > 1:
        raise ProtocolError(sites[0], f"sites produced different numbers of features {n_features}",
                            "run the same fedbiopsy and pyradiomics versions at every site")
    cases = {s: int(replies[s]["n_cases"]) for s in sites}  # type: ignore[call-overload]
    return {
        "settings_hash": reference,
        "n_features": n_features[sites[0]],
        "n_cases": sum(cases.values()),
        "cases_per_site": cases,
        "failed_per_site": {s: read_count(s, replies[s]["n_failed"]) for s in sites},
    }


def features_request(settings: RadiomicsSettings, spacing: Sequence[float] | None) -> Payload:
    """The request of the features round: the settings as JSON and, when known, the target spacing."""
    payload: Payload = {SETTINGS_KEY: json.dumps(settings.model_dump(mode="json"))}
    if spacing is not None:
        payload[SPACING_KEY] = np.asarray(spacing, dtype=np.float64)
    return payload


def run_features(query: Query, settings: RadiomicsSettings, spacing: Sequence[float] | None = None) -> dict:
    """Drive the features round: every site extracts and keeps its table; the summary of counts and the hash."""
    return summarise_feature_replies(query(FEATURES, features_request(settings, spacing)))
