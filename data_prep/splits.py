"""Seeded, persisted patient-level splits and the stratified EMBED test subset.

A split file holds patient ids only (no rows, no labels), so it can be kept next
to a dataset and reused to rebuild the same split:
    {"seed": 0, "fractions": {"train": .7, ...}, "splits": {"train": [ids], ...}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from typing import Iterable, Mapping

import numpy as np

SPLITS = ("train", "validation", "test")


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise ValueError(f"fractions: unknown split name(s) {unknown}; allowed {SPLITS}")
    if any(float(v) < 0 for v in fractions.values()):
        raise ValueError(f"fractions: negative value in {dict(fractions)}")
    total = sum(float(v) for v in fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total} ({dict(fractions)})")
    # A fixed order makes the assignment independent of the dict's key order.
    return {s: float(fractions[s]) for s in SPLITS if s in fractions}


def _cut(ids: list[str], fractions: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Shuffle ids and cut them at the rounded cumulative fractions."""
    n = len(ids)
    order = rng.permutation(n)
    out, start, cumulative = {}, 0, 0.0
    names = list(fractions)
    for i, name in enumerate(names):
        cumulative += fractions[name]
        stop = n if i == len(names) - 1 else min(n, math.floor(cumulative * n + 0.5))
        for j in order[start:stop]:
            out[ids[j]] = name
        start = stop
    return out


def patient_split(patient_ids: Iterable, fractions: Mapping[str, float], seed: int,
                  stratify: Mapping | None = None) -> dict[str, str]:
    """Map each patient id (as str) to a split; deterministic for a given seed.

    Ids are de-duplicated and sorted before a numpy default_rng(seed) permutation,
    so input order never matters. With `stratify` (patient id -> stratum label)
    every stratum is cut separately, in sorted stratum order, with the same rng.
    """
    fractions = _check_fractions(fractions)
    ids = sorted({str(p) for p in patient_ids})
    rng = np.random.default_rng(seed)
    if stratify is None:
        return _cut(ids, fractions, rng)
    strata: dict[str, list[str]] = {}
    for pid in ids:
        if pid not in stratify:
            raise ValueError(f"stratify: no stratum given for patient {pid!r}")
        strata.setdefault(str(stratify[pid]), []).append(pid)
    out: dict[str, str] = {}
    for key in sorted(strata):
        out.update(_cut(strata[key], fractions, rng))
    return out


def _hash_split(pid: str, fractions: dict[str, float], seed) -> str:
    """Split for a patient added later: a uniform draw from a hash of (seed, id).

    Depends on nothing but the id, so adding patients in any order or batch gives
    the same answer.
    """
    digest = hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()
    u = int(digest[:15], 16) / 16 ** 15
    cumulative = 0.0
    for name, f in fractions.items():
        cumulative += f
        if u < cumulative:
            return name
    return list(fractions)[-1]


def _read_split_file(path: str) -> tuple[dict, dict[str, str]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid splits JSON file ({e})") from e
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: expected an object with a 'splits' mapping")
    mapping: dict[str, str] = {}
    for name, ids in splits.items():
        if name not in SPLITS:
            raise ValueError(f"{path}: unknown split {name!r}; allowed {SPLITS}")
        if not isinstance(ids, list):
            raise ValueError(f"{path}: splits[{name!r}] must be a list of patient ids")
        for pid in ids:
            pid = str(pid)
            if pid in mapping and mapping[pid] != name:
                raise ValueError(f"{path}: patient {pid!r} is in both {mapping[pid]!r} "
                                 f"and {name!r}")
            mapping[pid] = name
    return data, mapping


def _write_split_file(path: str, seed, fractions: dict[str, float],
                      mapping: Mapping[str, str]) -> None:
    splits = {s: sorted(p for p, v in mapping.items() if v == s) for s in SPLITS}
    data = {"seed": seed, "fractions": fractions, "splits": splits}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Write then rename, so a killed run never leaves a half-written split file.
    fd, tmp = tempfile.mkstemp(prefix=".splits.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_or_create_splits(splits_file: str, patient_ids: Iterable, fractions: Mapping[str, float],
                          seed: int, stratify: Mapping | None = None) -> dict[str, str]:
    """Patient id -> split, reusing `splits_file` when it exists.

    An existing file wins over the arguments (its seed and fractions are kept).
    Patients missing from it are assigned by a hash of (file seed, id), appended,
    and the file is rewritten; a warning says how many. Without a file the split
    is made by patient_split and written atomically. Returns the mapping for every
    patient in the file and in `patient_ids`.
    """
    ids = sorted({str(p) for p in patient_ids})
    if not os.path.exists(splits_file):
        mapping = patient_split(ids, fractions, seed, stratify)
        _write_split_file(splits_file, seed, _check_fractions(fractions), mapping)
        return mapping

    data, mapping = _read_split_file(splits_file)
    file_seed = data.get("seed", seed)
    file_fractions = _check_fractions(data.get("fractions") or fractions)
    if file_seed != seed or file_fractions != _check_fractions(fractions):
        warnings.warn(f"{splits_file}: reusing the stored split (seed {file_seed}, "
                      f"fractions {file_fractions}); the seed/fractions passed are ignored",
                      stacklevel=2)
    new = [p for p in ids if p not in mapping]
    if new:
        for pid in new:
            mapping[pid] = _hash_split(pid, file_fractions, file_seed)
        warnings.warn(f"{splits_file}: {len(new)} patient(s) not in the stored split were "
                      f"assigned by hash and appended", stacklevel=2)
        _write_split_file(splits_file, file_seed, file_fractions, mapping)
    return mapping


def stratified_test_subset(rows: Iterable[Mapping], label_field: str, *, fraction: float = 0.1,
                           minimum: int = 200, seed: int = 42) -> set[str]:
    """Image ids of a per-class sample of the test rows (label -1 excluded).

    Each class keeps max(floor(fraction * n), minimum) of its n test images, or all
    of them when n is not larger (MaMA/GLAM's "10 %, at least 200" recipe).
    Classes are visited in sorted order and image ids sorted, so it is deterministic.
    """
    by_class: dict = {}
    for row in rows:
        if row["split"] != "test" or row[label_field] == -1:
            continue
        by_class.setdefault(row[label_field], []).append(str(row["image_id"]))
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        k = max(math.floor(fraction * len(ids) + 1e-9), minimum)
        if k >= len(ids):
            chosen.update(ids)
        else:
            chosen.update(ids[i] for i in rng.choice(len(ids), size=k, replace=False))
    return chosen
