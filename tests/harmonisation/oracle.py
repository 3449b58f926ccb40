"""The pooled oracles of the harmonisation tests: neuroCombat 0.2.12 run on the concatenated sites.

neuroCombat's traps (docs/COMBAT.md) are handled here explicitly, never by a looser tolerance:
* it casts a DataFrame ``dat`` to float32: it is given a float64 ndarray (features x patients);
* it casts continuous covariates to float32: the synthetic ages are float32-exact (checked here);
* its ``ref_batch`` path calls ``np.int``, gone since numpy 1.24: aliased to ``int`` for that call only;
* it prints progress: stdout is captured.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

SITE_COLUMN = "_site"


@contextlib.contextmanager
def numpy_int_alias() -> Iterator[None]:
    """``np.int = int`` for the duration of one neuroCombat call (its ref_batch path uses the removed alias)."""
    had = "int" in vars(np)
    np.int = int  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.int  # type: ignore[attr-defined]


def pooled(features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None = None
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The concatenated feature table and covariates (with the site in ``_site``), sites in the given order."""
    table = pd.concat([features[s] for s in features])
    cov = pd.concat([covariates[s] for s in features]) if covariates else pd.DataFrame(index=table.index)
    cov = cov.copy()
    cov[SITE_COLUMN] = np.concatenate([[s] * len(features[s]) for s in features])
    return table, cov


def pooled_neurocombat(features: Mapping[str, pd.DataFrame], covariates: Mapping[str, pd.DataFrame] | None = None,
                       *, batch: str | None = None, categorical: Sequence[str] = (), continuous: Sequence[str] = (),
                       **options: object) -> tuple[pd.DataFrame, dict]:
    """neuroCombat on the pooled data; returns the harmonised table (patients x features) and its estimates."""
    from neuroCombat import neuroCombat

    table, cov = pooled(features, covariates)
    for col in continuous:
        values = cov[col].to_numpy(dtype=np.float64)
        if not np.array_equal(values.astype(np.float32).astype(np.float64), values):
            raise AssertionError(f"continuous covariate {col!r} is not float32-exact: neuroCombat would round it")
    batch_col = batch or SITE_COLUMN
    dat = np.ascontiguousarray(table.to_numpy(dtype=np.float64).T)  # an ndarray: no float32 cast
    alias = numpy_int_alias() if options.get("ref_batch") is not None else contextlib.nullcontext()
    with alias, contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(dat, cov[[batch_col, *categorical, *continuous]], batch_col,
                          categorical_cols=list(categorical), continuous_cols=list(continuous), **options)
    return pd.DataFrame(out["data"].T, index=table.index, columns=table.columns), out["estimates"]


def max_rel_diff(a: pd.DataFrame, b: pd.DataFrame, reference: pd.DataFrame) -> float:
    """max over features of max |a - b| / sd(reference feature)."""
    diff = np.abs(a.to_numpy() - b.loc[a.index, a.columns].to_numpy())
    return float((diff / reference[a.columns].to_numpy().std(axis=0)).max())
