"""Issue 21 (5): what sites send is rendered escaped in the HTML report -- a site id, a refusal reason or a
count a hostile site chose cannot run script in an auditor's browser."""

from __future__ import annotations

from types import SimpleNamespace

from server.phases import report

SCRIPT = "<script>alert('site')</script>"


def test_site_strings_are_escaped_in_every_section_they_reach() -> None:
    outputs = {
        "fingerprint": {"cases_per_site": {SCRIPT: 6}, "scanners": {SCRIPT: {"vendor": SCRIPT}}, "n_cases": 6,
                        "n_sites": 1, "target_spacing": [1.0, 1.0, 1.0], "refused": {"7": SCRIPT}},
        "segmentation": {"network": SCRIPT, "n_parameters": 1, "strategy": "fedavg", "rounds": [{"sites": {}}],
                         "initial_dsc_median": 0.1, "final_dsc_median": 0.2},
        "inference": {"segmented_per_site": {SCRIPT: "<5"}, "empty_per_site": {SCRIPT: "<5"}},
    }
    ctx = SimpleNamespace(outputs=outputs)
    for build in (report._cohort, report._segmentation):
        body = build(ctx).body  # type: ignore[arg-type]
        assert "<script>" not in body and "&lt;script&gt;" in body, build.__name__
