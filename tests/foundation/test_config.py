"""The study config: validated once, frozen, hashed; bad keys named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.config import load_study_config
from common.errors import ConfigError


def test_default_study_loads_and_hash_is_stable_and_content_sensitive(tmp_path) -> None:
    a, b = load_study_config(), load_study_config()
    assert a.hash == b.hash and len(a.hash) == 64
    assert load_study_config(seed=1).hash != a.hash
    with pytest.raises(ValidationError):  # frozen
        a.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sequences: [T2w]\nreference_sequence: CET1\n", "reference_sequence 'CET1' is not one of"),
        ("fingerprnt: {}\n", "fingerprnt: Extra inputs"),
        ("fingerprint: {percentiles: [50, 5]}\n", "fingerprint.percentiles"),
        ("schema_version: 99\n", "newer than this fedbiopsy"),
        ("- a\n- b\n", "top level is not a mapping"),
    ],
)
def test_bad_study_config_names_the_key(tmp_path, text, expected) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_study_config(path)
    assert err.value.path == str(path)
