"""A site's feature table (patients x features) checked and turned into a float64 matrix.

Shared by the harmonisation and reduction protocols; every problem raises :class:`ProtocolError` naming the
site, the columns at fault and the fix (never a patient id: errors travel to the server).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from common.errors import ProtocolError


def feature_matrix(site_id: str, table: pd.DataFrame, what: str = "feature table") -> np.ndarray:
    """The table's values as float64; raises on an empty table, repeated or non-numeric columns, NaN/inf values."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ProtocolError(site_id, f"the {what} is empty", "extract features for the site's cases first")
    cols = [str(c) for c in table.columns]
    if len(set(cols)) != len(cols):
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        raise ProtocolError(site_id, f"column(s) {dupes[:10]} of the {what} repeat", "give each feature a unique name")
    if table.index.has_duplicates:
        raise ProtocolError(site_id, f"a patient appears in more than one row of the {what}",
                            "keep one row per patient")
    odd = [c for c, dt in table.dtypes.items() if not is_numeric_dtype(dt) or is_bool_dtype(dt)]
    if odd:
        coerced = table[odd].apply(pd.to_numeric, errors="coerce")
        text = [str(c) for c in odd if coerced[c].isna().sum() > table[c].isna().sum() or is_bool_dtype(table[c])]
        if text:
            raise ProtocolError(site_id, f"column(s) {text[:10]} of the {what} are not numeric",
                                "keep numeric features only")
        table = table.assign(**{str(c): coerced[c] for c in odd})
    values = table.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        counts = bad.sum(axis=0)
        named = [f"{c} ({k})" for c, k in zip(cols, counts, strict=True) if k][:10]
        raise ProtocolError(site_id, f"NaN/inf values in {int((counts > 0).sum())} column(s) of the {what}: {named}",
                            "impute or drop those values/features first")
    return values
