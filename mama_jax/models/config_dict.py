"""Tower configs <-> JSON-safe dicts: converted towers and exported packages store them."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DTYPE_FIELDS = ("dtype", "param_dtype")


def to_dict(cfg) -> dict:
    """dataclasses.asdict with the dtype fields as names ("bfloat16")."""
    out = dataclasses.asdict(cfg)
    for name in DTYPE_FIELDS:
        if name in out:
            out[name] = jnp.dtype(getattr(cfg, name)).name
    return out


def known_fields(cls, d: dict, what: str) -> dict:
    """A copy of d; a ValueError naming every field that the dataclass cls lacks."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}")
    return dict(d)
