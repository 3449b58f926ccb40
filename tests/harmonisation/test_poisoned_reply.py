"""Issue 21 (4): a poisoned ComBat reply -- round-1 sums no set of patients could give, crafted to steer the
pooled fit -- is refused by the server step; the same reply summed unchecked moves every site's harmonised
features, so the test can fail."""

from __future__ import annotations

import numpy as np
import pytest

from common.combat_spec import CombatOptions
from common.errors import ProtocolError
from common.harmonisation import run_harmonisation_in_memory
from common.harmonisation_server import check_fit_reply
from common.protocol import Payload
from simulations.synthetic_features import synthetic_feature_sites

OPTIONS = CombatOptions(continuous=("age",))


def _poison(kind: str):  # noqa: ANN202 - a wire hook
    def wire(direction: str, action: str, site: str, payload: Payload) -> Payload:
        if direction == "reply" and site == "site-02" and "wtw" in payload:
            payload = dict(payload)
            wtw = np.array(payload["wtw"], dtype=np.float64)
            if kind == "not_psd":  # batch-by-age sums no patients could have (Cauchy-Schwarz): pulls the age slope
                wtw[1, -1] = wtw[-1, 1] = 5.0 * wtw[1, -1]
            elif kind == "counts":  # claims ten times the patients of its batch
                wtw[1, 1] *= 10
            payload["wtw"] = wtw
        return payload

    return wire


@pytest.mark.parametrize(("kind", "problem"), [("not_psd", "positive semi-definite"), ("counts", "batch counts")])
def test_a_poisoned_fit_reply_is_refused(kind: str, problem: str) -> None:
    features, covariates = synthetic_feature_sites([10, 12, 8], 6, seed=0)
    honest, _ = run_harmonisation_in_memory(features, covariates, OPTIONS)
    with pytest.raises(ProtocolError, match=f"site-02.*{problem}"):
        run_harmonisation_in_memory(features, covariates, OPTIONS, wire=_poison(kind))
    # unchecked, the same reply changes the result everywhere (what the check prevents)
    import common.harmonisation_server as server

    original = server.check_fit_reply
    server.check_fit_reply = lambda *a, **k: None  # type: ignore[assignment]
    try:
        poisoned, _ = run_harmonisation_in_memory(features, covariates, OPTIONS, wire=_poison(kind))
    finally:
        server.check_fit_reply = original
    assert max(float(np.abs(poisoned[s].to_numpy() - honest[s].to_numpy()).max()) for s in honest) > 1e-3


def test_an_honest_reply_passes_the_check() -> None:
    rng = np.random.default_rng(0)
    w = np.hstack([np.eye(2)[rng.integers(0, 2, 20)], rng.normal(size=(20, 1))])
    check_fit_reply("s", w.T @ w, w[:, :2].sum(axis=0), np.ones((2, 3)), 2)
