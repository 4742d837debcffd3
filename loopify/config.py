"""Shared by the versioned config dataclasses (ConvertConfig, TrainConfig): reading one back
from a dict (a manifest) with unknown fields refused and JSON lists turned back into tuples."""

from __future__ import annotations

import dataclasses


def fields_from_dict(cls, d: dict, error: type[Exception], what: str = "config") -> dict:
    """Keyword arguments for ``cls(**...)`` from ``d``.

    Raises:
        error: naming the first unknown field and listing the valid ones.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise error(f"unknown {what} field '{unknown[0]}'; fields: {', '.join(sorted(known))}")
    out = dict(d)
    for name, value in out.items():
        if isinstance(value, list) and "tuple" in str(known[name].type):
            out[name] = tuple(value)
    return out
