"""Data frames with fixed columns and dtypes, for the dashboard's tables (Tabulator formats columns by dtype)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def typed_frame(rows: list[dict[str, Any]], columns: dict[str, type]) -> pd.DataFrame:
    """A frame with these columns and dtypes even when empty."""
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(
        {k: ("float64" if t is float else "int64" if t is int else "object") for k, t in columns.items()}
    )


def rounded(v: float | None, digits: int = 1) -> float:
    """``v`` rounded for reading; NaN (an empty cell) for None."""
    return math.nan if v is None else round(float(v), digits)
