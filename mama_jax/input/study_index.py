"""Study index: for every record, the records that may serve as its second view.

Built from the small `study_id` / `laterality` fields without decoding images
(the raw record bytes are parsed on a thread pool) and cached next to the
dataset, keyed by a fingerprint of its files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mama_jax.input import records

SECOND_VIEWS = ("intra_study", "same_image", "intra_side", "intra_study_no_self")
INDEX_FIELDS = ("study_id", "laterality")
_INDEX_VERSION = "1"  # bump when the cached index format changes
_EMPTY = np.zeros((0,), np.int32)


def record_text(value) -> str:
    """A record's text field (bytes, numpy bytes or str) as str."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _tfds_location(source) -> tuple[str, str] | None:
    """(dataset folder, split) of a TFDS data source; None for any other sequence."""
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    data_dir = getattr(info, "data_dir", None)
    return (os.fspath(data_dir), str(split)) if data_dir and split is not None else None


def _fingerprint(data_dir: str, split: str) -> str:
    """Changes whenever the split's files or the dataset metadata change."""
    h = hashlib.sha256(f"{_INDEX_VERSION}|{split}".encode())
    with open(os.path.join(data_dir, "dataset_info.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(data_dir)):
        if f"-{split}." in name:
            st = os.stat(os.path.join(data_dir, name))
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _read_fields_tfds(source) -> dict[str, np.ndarray]:
    """The index fields of every record without decoding images.

    A TFDS record is a serialised tf.train.Example keyed by feature name; parsing it
    alone skips TFDS's per-field numpy conversion and the zlib image decode. Reading
    the record bytes still dominates (~6 ms per 1036 px image here) and releases the
    GIL, so chunks are read on a thread pool.
    """
    raw = source.data_source  # array_record source: index -> serialised bytes

    def read(lo: int, hi: int) -> list[tuple[str, ...]]:
        rows = []
        for i in range(lo, hi):
            feature = records.example_features(raw[i])
            missing = [k for k in INDEX_FIELDS if k not in feature]
            if missing:
                raise KeyError(f"record {i}: no field(s) {missing} (not a data_prep dataset?)")
            rows.append(tuple(feature[k].bytes_list.value[0].decode("utf-8") for k in INDEX_FIELDS))
        return rows

    n = len(raw)
    logging.info("building the study index of %d records (cached afterwards)", n)
    workers = min(32, max(4, os.cpu_count() or 1))
    bounds = list(range(0, n, max(16, min(1024, -(-n // (4 * workers)))))) + [n]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = [r for part in pool.map(read, bounds[:-1], bounds[1:]) for r in part]
    columns = list(zip(*rows)) if rows else [()] * len(INDEX_FIELDS)
    return {k: np.asarray(col, dtype=str).reshape(-1) for k, col in zip(INDEX_FIELDS, columns)}


def index_fields(source) -> dict[str, np.ndarray]:
    """study_id and laterality of every record, as str arrays.

    TFDS sources are read without decoding images and cached next to the dataset in
    mama_jax_index/<split>-<fingerprint>.npz (skipped if the folder is read-only); any
    other sequence of record dicts is read record by record.
    """
    location = _tfds_location(source)
    if location is None:
        fields = {k: [] for k in INDEX_FIELDS}
        for i in range(len(source)):
            record = source[i]
            for k in INDEX_FIELDS:
                if k not in record:
                    raise KeyError(f"record {i}: no field {k!r}")
                fields[k].append(record_text(record[k]))
        return {k: np.asarray(v, dtype=str).reshape(-1) for k, v in fields.items()}
    data_dir, split = location
    cache = os.path.join(data_dir, "mama_jax_index", f"{split}-{_fingerprint(data_dir, split)}.npz")
    if os.path.exists(cache):
        with np.load(cache) as z:
            fields = {k: z[k] for k in INDEX_FIELDS}
        if all(len(v) == len(source) for v in fields.values()):
            return fields
    fields = _read_fields_tfds(source)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.{threading.get_ident()}.tmp.npz"
        np.savez(tmp, **fields)
        os.replace(tmp, cache)  # atomic: concurrent hosts never see a partial file
    except OSError as err:
        logging.warning("study index not cached (%s): %s", cache, err)
    return fields


def _others_in_group(codes: np.ndarray) -> list[np.ndarray]:
    """For each record, the other records with the same code (negative = alone)."""
    out = [_EMPTY] * len(codes)
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    for group in np.split(order.astype(np.int32), starts[1:]):
        if len(group) > 1 and codes[group[0]] >= 0:
            for i in group:
                out[i] = group[group != i]
    return out


def study_index(source, strategy: str) -> list[np.ndarray]:
    """Per record, the candidate second views (record indices, same split, never itself).

    intra_study / intra_study_no_self: the other images of the study (the self view of
    intra_study is drawn in choose_second_view); intra_side: the other images of the
    same study and laterality (unknown laterality has no partner); same_image: none.
    """
    if strategy not in SECOND_VIEWS:
        raise ValueError(f"second-view strategy {strategy!r} not in {SECOND_VIEWS}")
    if strategy == "same_image":
        return [_EMPTY] * len(source)
    fields = index_fields(source)
    study = np.unique(fields["study_id"], return_inverse=True)[1].astype(np.int64).reshape(-1)
    if np.any(fields["study_id"] == ""):
        study[fields["study_id"] == ""] = -1  # no study id: no partner
    if strategy == "intra_side":
        side = np.unique(fields["laterality"], return_inverse=True)[1].reshape(-1)
        unknown = (fields["laterality"] == "") | (study < 0)
        study = np.where(unknown, -1, study * (side.max() + 1) + side)
    return _others_in_group(study)
