"""Federated radiogenomics: which imaging features differ between the two levels of a genomic column.

One round. Each site answers, for its patients with both the features and the genomic value, the count, mean
and centred sum of squares of every feature in each of the two groups (:func:`site_association_moments`); where
a group holds fewer than ``min_cell`` patients the site withholds both (sends them empty) and says so. The server pools
the group moments exactly (:func:`common.pooled_moments.merge_group_moments`) and, per feature, computes the
mean difference, the standardised difference (pooled SD), Welch's t-test (scipy's ``ttest_ind(equal_var=
False)`` on the pooled rows) and the Benjamini-Hochberg q-value across features (scipy's
``false_discovery_control``) -- :func:`association_table`. The driver is :func:`run_radiogenomics`.

The released sets are the site's two groups and their union; the ledger holds them in scope ``features``, with
every other sum over the site's feature rows (k-means, prognosis on a feature table), so that a release whose
patients differ from another's by a few (patients without a genomic value, a group close to a k-means cluster)
is held: the site answers empty groups with ``held`` 1, and the hold counts against the study in the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.errors import ProtocolError
from common.pooled_moments import GroupMoments, check_matrix, merge_group_moments, require_cohort
from common.protocol import Payload, Query, SiteFunction
from common.release_ledger import FEATURES, ReleaseLedger, partition

ASSOCIATION_MOMENTS = "association_moments"


@dataclass
class AssociationSite:
    """One site's data (stays at the site): features per patient and the genomic group (0 reference, 1 other)."""

    site_id: str
    features: np.ndarray
    feature_names: tuple[str, ...]
    groups: np.ndarray
    ids: tuple[str, ...] = ()
    min_cohort: int = 1
    min_cell: int = 1
    ledger: ReleaseLedger | None = None
    study_key: str = ""


def site_association_moments(site: AssociationSite, request: Mapping[str, object]) -> Payload:
    """The two groups' moments of every feature; a group under ``min_cell`` patients is withheld."""
    x = check_matrix(site.site_id, site.features)
    g = np.asarray(site.groups).astype(np.int64)
    if g.shape != (x.shape[0],) or not np.isin(g, (0, 1)).all():
        raise ProtocolError(site.site_id, "the genomic groups do not match the feature rows",
                            "code the column's two levels as 0 and 1 for every row")
    require_cohort(site.site_id, x.shape[0], site.min_cohort)
    counts = [int((g == level).sum()) for level in (0, 1)]
    small = any(0 < c < site.min_cell for c in counts)
    # a small group is withheld with the other: sending the other alone would difference against any sum over all
    keep = np.zeros(g.size, dtype=bool) if small else np.ones(g.size, dtype=bool)
    withheld = [level for level in (0, 1) if counts[level] and small]
    held = 0
    if site.ledger is not None:  # held against every other sum over these rows (k-means, prognosis: one scope)
        ids = [site.ids[i] for i in np.flatnonzero(keep)]
        if ids and not site.ledger.try_release(FEATURES, ids, [ids, *partition(ids, g[keep])], site.study_key):
            keep[:] = False  # a group too close to an earlier released set: the site's answer is held (empty)
            held = 1
            withheld = [level for level in (0, 1) if counts[level]]
    moments = GroupMoments.of(x[keep], g[keep], 2)
    return {"n": moments.n, "mean": moments.mean, "m2": moments.m2, "features": list(site.feature_names),
            "withheld_groups": withheld, "held": held}


@dataclass(frozen=True)
class AssociationTable:
    """Per feature: group sizes and means, the differences, Welch's t, its p and the BH q-value."""

    features: tuple[str, ...]
    n: np.ndarray  # (2,)
    mean: np.ndarray  # (2, p)
    sd: np.ndarray  # (2, p), ddof 1
    difference: np.ndarray  # mean[1] - mean[0]
    standardised: np.ndarray  # difference / pooled sd
    t: np.ndarray
    df: np.ndarray
    p: np.ndarray
    q: np.ndarray
    withheld: dict[str, list[int]]

    def rows(self, fdr: float) -> list[dict]:
        """One row per feature, sorted by p."""
        order = np.argsort(self.p, kind="stable")
        return [{"feature": self.features[j], "mean_reference": float(self.mean[0, j]),
                 "mean_other": float(self.mean[1, j]), "difference": float(self.difference[j]),
                 "standardised_difference": float(self.standardised[j]), "t": float(self.t[j]),
                 "df": float(self.df[j]), "p": float(self.p[j]), "q": float(self.q[j]),
                 "associated": bool(self.q[j] < fdr)} for j in order]


def association_table(replies: Mapping[str, Mapping[str, object]]) -> AssociationTable:
    """The server step: pool the sites' group moments, then Welch's test and BH q-values per feature."""
    from scipy import stats

    sites = sorted(replies)
    if not sites:
        raise ProtocolError("(none)", "no site answered the association round")
    names = tuple(str(f) for f in replies[sites[0]].get("features", []))  # type: ignore[attr-defined]
    parts = []
    for site in sites:
        rep = replies[site]
        if tuple(str(f) for f in rep.get("features", [])) != names:  # type: ignore[attr-defined]
            raise ProtocolError(site, "its feature columns differ from the other sites'",
                                "use the same feature table at every site")
        n = np.asarray(rep["n"], dtype=np.int64).ravel()
        mean = np.asarray(rep["mean"], dtype=np.float64).reshape(2, -1)
        m2 = np.asarray(rep["m2"], dtype=np.float64).reshape(2, -1)
        if n.shape != (2,) or mean.shape[1] != len(names) or np.any(n < 0) or not np.all(np.isfinite(mean)) \
                or not np.all(np.isfinite(m2)) or np.any(m2 < 0):
            raise ProtocolError(site, "its group moments are malformed", "run the same fedbiopsy version everywhere")
        parts.append(GroupMoments(n, mean, m2))
    pooled = merge_group_moments(parts)
    if np.any(pooled.n < 2):
        raise ProtocolError("(pooled)", f"a level of the genomic column has {int(pooled.n.min())} patient(s) over "
                            "the sites", "a two-group test needs at least two patients in each")
    var = pooled.m2 / (pooled.n[:, None] - 1)
    se2 = var / pooled.n[:, None]
    diff = pooled.mean[1] - pooled.mean[0]
    t = diff / np.sqrt(se2.sum(axis=0))
    df = se2.sum(axis=0) ** 2 / (se2[0] ** 2 / (pooled.n[0] - 1) + se2[1] ** 2 / (pooled.n[1] - 1))
    p = 2 * stats.t.sf(np.abs(t), df)
    pooled_sd = np.sqrt(pooled.m2.sum(axis=0) / (pooled.n.sum() - 2))
    return AssociationTable(features=names, n=pooled.n, mean=pooled.mean, sd=np.sqrt(var), difference=diff,
                            standardised=diff / pooled_sd, t=t, df=df, p=p,
                            q=stats.false_discovery_control(p, method="bh"),
                            withheld={s: list(replies[s].get("withheld_groups", []))  # type: ignore[call-overload]
                                      for s in sites})


def run_radiogenomics(query: Query) -> AssociationTable:
    """The one round of the protocol over ``query``'s sites."""
    return association_table(query(ASSOCIATION_MOMENTS, {}))


RADIOGENOMICS_STEPS: dict[str, SiteFunction] = {ASSOCIATION_MOMENTS: site_association_moments}

__all__ = ["ASSOCIATION_MOMENTS", "RADIOGENOMICS_STEPS", "AssociationSite", "AssociationTable",
           "association_table", "run_radiogenomics", "site_association_moments"]

