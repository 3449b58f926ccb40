"""The map fits against curves and signals made by independent code: Tofts with Parker's AIF, ADC, IVIM, SPGR."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from common.maps.dce import aif_blood, concentration, curve_features, fit_tofts
from common.maps.dwi import fit_adc, fit_ivim
from common.maps.layout import DCESidecar
from simulations.phantoms_mp import spgr_signal

HCT = 0.42


def parker_blood_mM(t_s: np.ndarray, t0_s: float) -> np.ndarray:
    """Parker et al. 2006 (MRM 56:993), Table 1, written out here from the paper's parameters (not dcmri's)."""
    t = (t_s - t0_s) / 60.0  # minutes
    a1, a2, t1, t2, s1, s2 = 0.809, 0.330, 0.17046, 0.365, 0.0563, 0.132
    alpha, beta, s, tau = 1.050, 0.1685, 38.078, 0.483
    g1 = a1 / (s1 * np.sqrt(2 * np.pi)) * np.exp(-((t - t1) ** 2) / (2 * s1**2))
    g2 = a2 / (s2 * np.sqrt(2 * np.pi)) * np.exp(-((t - t2) ** 2) / (2 * s2**2))
    return g1 + g2 + alpha * np.exp(-beta * t) / (1 + np.exp(-s * (t - tau)))


def tofts_curve(ktrans_min: float, ve: float, vp: float, times: np.ndarray, t0: float) -> np.ndarray:
    """Tissue concentration of the (extended) Tofts model by FFT convolution on a 0.01 s grid, then sampled."""
    dt = 0.01
    fine = np.arange(0.0, times[-1] + dt, dt)
    cp = parker_blood_mM(fine, t0) / (1.0 - HCT)
    kt = ktrans_min / 60.0
    tissue = kt * fftconvolve(cp, np.exp(-(kt / ve) * fine))[: fine.size] * dt + vp * cp
    return np.interp(times, fine, tissue)


def _sidecar(times: np.ndarray, t0: float, baseline: int = 5) -> DCESidecar:
    return DCESidecar(AcquisitionTimes_s=tuple(times), RepetitionTime_s=0.004, FlipAngle_deg=15.0, T10_s=1.4,
                      Relaxivity_per_mM_s=4.5, Hematocrit=HCT, InjectionTime_s=t0, BaselineVolumes=baseline)


def test_parker_aif_is_dcmri_population_curve() -> None:
    t = np.arange(0.0, 300.0, 0.5)
    ours = aif_blood(t, _sidecar(t, 20.0))
    assert np.max(np.abs(ours - parker_blood_mM(t, 20.0))) < 0.01 * ours.max()


@pytest.mark.parametrize(("ktrans", "ve"), [(0.25, 0.30), (0.08, 0.15), (0.6, 0.45)])
@pytest.mark.parametrize("dt", [2.0, 4.5])
def test_standard_tofts_recovers_independent_curve(ktrans: float, ve: float, dt: float) -> None:
    times = np.arange(0.0, 300.0, dt)
    curve = tofts_curve(ktrans, ve, 0.0, times, 30.0)
    fit = fit_tofts(curve[None], times, aif_blood(times, _sidecar(times, 30.0)), HCT)
    assert fit["Ktrans"][0] == pytest.approx(ktrans, rel=0.02)
    assert fit["ve"][0] == pytest.approx(ve, rel=0.02)
    # Without the haematocrit (blood taken for plasma) Ktrans would be off by 1 / (1 - Hct): 72 %.
    wrong = fit_tofts(curve[None], times, aif_blood(times, _sidecar(times, 30.0)), 0.0)
    assert abs(wrong["Ktrans"][0] / ktrans - 1) > 0.3


def test_extended_tofts_recovers_vp() -> None:
    times = np.arange(0.0, 300.0, 2.0)
    curve = tofts_curve(0.2, 0.35, 0.05, times, 30.0)
    blood = aif_blood(times, _sidecar(times, 30.0))
    fit = fit_tofts(curve[None], times, blood, HCT, extended=True)
    assert fit["Ktrans"][0] == pytest.approx(0.2, rel=0.03)
    assert fit["ve"][0] == pytest.approx(0.35, rel=0.03)
    assert fit["vp"][0] == pytest.approx(0.05, rel=0.05)
    standard = fit_tofts(curve[None], times, blood, HCT)
    assert abs(standard["Ktrans"][0] / 0.2 - 1) > 0.05  # the plasma term biases the standard model


def test_spgr_signal_is_dcmri_signal_ss() -> None:
    import dcmri

    r1 = np.array([0.3, 0.8, 2.0, 7.5])
    ours = spgr_signal(1200.0, r1, 0.0045, 12.0)
    theirs = np.array([dcmri.signal_ss(1200.0, r, 0.0045, 12.0) for r in r1])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_concentration_inverts_the_spgr_signal() -> None:
    times = np.arange(0.0, 200.0, 3.0)
    sc = _sidecar(times, 30.0, baseline=5)
    conc = np.zeros((3, times.size))
    conc[:, 10:] = np.array([[0.2], [1.0], [2.5]]) * np.linspace(1.0, 0.6, times.size - 10)
    signal = spgr_signal(1000.0, 1.0 / 1.4 + 4.5 * conc, 0.004, 15.0)
    np.testing.assert_allclose(concentration(signal, sc, 1.4), conc, atol=1e-9)
    assert np.max(np.abs(concentration(signal, sc, 1.0) - conc)) > 0.05  # the native T1 matters


def test_curve_features_of_a_known_curve() -> None:
    times = np.arange(0.0, 120.0, 10.0)  # s
    rel = np.array([0, 0, 0, 0.5, 1.0, 1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6])
    signal = 100.0 * (1.0 + rel)[None]
    conc = np.clip(rel, 0, None)[None]
    sc = DCESidecar(AcquisitionTimes_s=tuple(times), RepetitionTime_s=0.004, FlipAngle_deg=15.0, T10_s=1.0,
                    Relaxivity_per_mM_s=4.5, InjectionTime_s=20.0, BaselineVolumes=2)
    f = curve_features(signal, conc, times, sc)
    assert f["TTP"][0] == pytest.approx(50.0 - 20.0)
    assert f["ER"][0] == pytest.approx(1.2)
    assert f["washin"][0] == pytest.approx(0.05 * 60.0)  # steepest rise 0.5 per 10 s before the peak
    assert f["washout"][0] == pytest.approx((0.6 - 1.2) / 60.0 * 60.0)
    late = DCESidecar(**{**sc.model_dump(), "InjectionTime_s": 200.0})
    assert curve_features(signal, conc, times, late)["iAUC60"][0] == 0.0  # injected after the last volume
    # initial area: trapezoid of the concentration from 20 s to 80 s
    fine = np.linspace(20.0, 80.0, 601)
    assert f["iAUC60"][0] == pytest.approx(np.trapezoid(np.interp(fine, times, conc[0]), fine), rel=1e-3)


def test_adc_weighted_least_squares() -> None:
    b = np.array([0.0, 100.0, 500.0, 800.0, 1000.0])
    adc = np.array([0.6e-3, 1.0e-3, 2.5e-3])
    clean = 800.0 * np.exp(-np.outer(adc, b))
    est, s0 = fit_adc(clean, b)
    np.testing.assert_allclose(est, adc, rtol=1e-9)
    np.testing.assert_allclose(s0, 800.0, rtol=1e-9)
    rng = np.random.default_rng(3)
    noisy = np.hypot(np.repeat(clean, 2000, axis=0) + 16.0 * rng.standard_normal((6000, b.size)),
                     16.0 * rng.standard_normal((6000, b.size)))
    med = np.median(fit_adc(noisy, b)[0].reshape(3, 2000), axis=1)
    np.testing.assert_allclose(med, adc, rtol=0.05)
    with pytest.raises(ValueError, match="expected"):
        fit_adc(clean[:, :3], b)


def test_ivim_with_dipy() -> None:
    b = np.array([0.0, 20.0, 50.0, 100.0, 200.0, 400.0, 600.0, 800.0, 1000.0])
    d, dstar, f = 1.1e-3, 15e-3, 0.12
    clean = 1000.0 * (f * np.exp(-b * dstar) + (1 - f) * np.exp(-b * d))
    rng = np.random.default_rng(0)
    noisy = clean[None] + 5.0 * rng.standard_normal((200, b.size))
    out = fit_ivim(noisy, b)
    assert np.median(out["IVIM_D"]) == pytest.approx(d, rel=0.05)
    assert np.median(out["IVIM_f"]) == pytest.approx(f, rel=0.2)
    assert np.median(fit_adc(noisy, b)[0]) > 1.1 * d  # mono-exponential ADC absorbs the perfusion
    with pytest.raises(ValueError, match="at least 4"):
        fit_ivim(noisy[:, :3], b[:3])


def test_the_sidecar_holds_its_per_volume_rules() -> None:
    times = tuple(float(t) for t in np.arange(0.0, 60.0, 5.0))  # 12 volumes
    base = {"AcquisitionTimes_s": times, "RepetitionTime_s": 0.004, "FlipAngle_deg": 15.0, "T10_s": 1.2,
            "Relaxivity_per_mM_s": 4.5, "InjectionTime_s": 10.0, "BaselineVolumes": 2}
    assert DCESidecar(**base).BaselineVolumes == 2
    with pytest.raises(ValueError, match="BaselineVolumes leaves no dynamic volume"):
        DCESidecar(**{**base, "BaselineVolumes": 12})
    with pytest.raises(ValueError, match="AIF lists 3 values for 12 acquisition times"):
        DCESidecar(**{**base, "AIF": (0.1, 0.2, 0.3)})
    given = DCESidecar(**{**base, "AIF": tuple(np.linspace(0.0, 5.0, 12))})
    np.testing.assert_allclose(aif_blood(times, given), np.linspace(0.0, 5.0, 12))
    with pytest.raises(ValueError, match="must increase strictly"):
        DCESidecar(**{**base, "AcquisitionTimes_s": (0.0, 5.0, 5.0, 10.0)})
