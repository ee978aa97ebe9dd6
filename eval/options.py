"""Config keys several eval apps share (eval, dashboard, autointerp), checked in one place.

Imports nothing heavy: an app can check its config before torch loads."""

from __future__ import annotations

from typing import Any


def outlier_factor_check(value: Any) -> tuple[bool, str]:
    """(ok, message) for `outlier_factor`: run (the run's own data.outlier_factor), null (keep every
    row) or a number > 1 (rows with a norm above it x the median row norm are left out)."""
    ok = value in ("run", None) or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1)
    return ok, f"outlier_factor must be run, null or a number > 1, got {value!r}"
