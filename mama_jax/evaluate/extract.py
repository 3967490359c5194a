"""Embeddings of every image of a split: global image embedding e_I(x) and pooled g(x).

`run` writes WORKDIR/embeddings_<split>.npz per split (config: configs/extract.py);
`extract_split` is the reusable part (zero-shot, linear probe and reports call it).
Labels come from the eval batches (the same rules training uses: density as its class
index 0..3); ids and subset flags are read from the source records by record index.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mama_jax import factory
from mama_jax.input import pipeline
from mama_jax.evaluate import restore

ID_FIELDS = ("patient_id", "image_id", "study_id", "laterality")
FLAG_FIELDS = ("in_birads_test_subset", "in_density_test_subset")
LABELS = ("birads", "density", "cancer")


# ----------------------------------------------------------------------------- config

def eval_data_config(cfg, pretrain_cfg=None) -> pipeline.DataConfig:
    """DataConfig of an eval job: the pretraining run's image_size and max_length, the
    eval config's dataset_dir when set (else the pretraining run's)."""
    pretrain_cfg = pretrain_cfg or restore.load_pretrain_config(cfg.pretrain_workdir)
    pretrain_cfg = pretrain_cfg.copy_and_resolve_references()
    if cfg.get("dataset_dir"):
        factory.require_path(cfg.dataset_dir, "dataset_dir",
                             "pass the TFDS version folder (…/tfds/mammography/<dataset>/1.0.0) "
                             "or leave it empty to use the pretraining run's dataset")
        pretrain_cfg.data.dataset_dir = cfg.dataset_dir
    return factory.data_config(pretrain_cfg)


def require_pretrain_workdir(cfg) -> str:
    return factory.require_path(cfg.get("pretrain_workdir", ""), "pretrain_workdir",
                                "pass --config.pretrain_workdir=<the pretraining run's --workdir>")


# ----------------------------------------------------------------------------- records

def _parse_fields(raw: bytes, keys: Sequence[str], i: int) -> list:
    from tensorflow_datasets.proto import tf_example_pb2

    feature = tf_example_pb2.Example.FromString(raw).features.feature
    row = []
    for k in keys:
        if k not in feature:
            raise KeyError(f"record {i}: no field {k!r} (not a data_prep dataset?)")
        f = feature[k]
        kind = f.WhichOneof("kind")
        if kind == "bytes_list":
            row.append(f.bytes_list.value[0].decode("utf-8"))
        elif kind == "int64_list":
            row.append(int(f.int64_list.value[0]))
        else:
            raise ValueError(f"record {i}: field {k!r} is not a scalar text/int field ({kind})")
    return row


def _column(values: list, key: str) -> np.ndarray:
    if all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=str).reshape(-1)
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.asarray(values, dtype=np.int64).reshape(-1)
    raise ValueError(f"record field {key!r} mixes text and numbers")


def record_fields(source, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The scalar fields `keys` of every record (str or int64 arrays, record order).

    TFDS sources are parsed from the serialised records without decoding the image
    (decoding dominates reading at paper resolution); any other sequence of dicts is
    read record by record (bytes decoded as UTF-8).
    """
    keys = tuple(keys)
    raw = getattr(source, "data_source", None)
    if raw is not None and hasattr(raw, "__getitems__"):
        n = len(raw)

        def read(lo: int) -> list:
            hi = min(n, lo + step)
            return [_parse_fields(r, keys, lo + j)
                    for j, r in enumerate(raw.__getitems__(list(range(lo, hi))))]

        step = max(64, -(-n // 64))
        with ThreadPoolExecutor(max_workers=min(16, max(2, os.cpu_count() or 1))) as pool:
            rows = [r for part in pool.map(read, range(0, n, step)) for r in part]
    else:
        rows = []
        for i in range(len(source)):
            record = source[i]
            row = []
            for k in keys:
                if k not in record:
                    raise KeyError(f"record {i}: no field {k!r}")
                v = record[k]
                v = v.item() if isinstance(v, np.ndarray) else v
                row.append(v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v)
            rows.append(row)
    columns = list(zip(*rows)) if rows else [()] * len(keys)
    return {k: _column(list(c), k) if c else np.zeros((0,), np.int64) for k, c in zip(keys, columns)}


# ----------------------------------------------------------------------------- embeddings

def image_embed_fn(graphdef):
    """Jitted (state, images: grey uint16 [B, S, S] or [B, S, S, 3]) ->
    (e_I(x) [B, d] fp32, g(x) [B, Dv] fp32).

    The state is an argument, not a closure constant, so XLA does not fold the weights
    into the program, and one compiled program serves every new state (pretraining's
    live evaluation).
    """
    @jax.jit
    def embed(state, images):
        m = nnx.merge(graphdef, state)
        pooled, _ = m.image_features(images)
        return m.img_global(pooled).astype(jnp.float32), pooled.astype(jnp.float32)

    return embed


def image_embedder(model):
    """Jitted images (grey uint16 [B, S, S] or [B, S, S, 3]) ->
    (e_I(x) [B, d] fp32, g(x) [B, Dv] fp32)."""
    graphdef, state = nnx.split(model)
    embed = image_embed_fn(graphdef)
    return lambda images: embed(state, images)


def in_record_order(columns: dict[str, np.ndarray], n: int, split: str) -> dict[str, np.ndarray]:
    """Columns of encoded rows sorted by their "index"; every one of the n records must be
    there exactly once (eval batches pad the last batch and split over hosts)."""
    order = np.argsort(columns["index"], kind="stable")
    out = {k: v[order] for k, v in columns.items()}
    if not np.array_equal(out["index"], np.arange(n)):
        raise RuntimeError(f"split {split!r}: encoded {len(out['index'])} rows for {n} records "
                           "(some records missing or repeated)")
    return out


def extract_split(model, tok, data_cfg: pipeline.DataConfig, split: str, batch_size: int,
                  *, source=None) -> dict[str, np.ndarray]:
    """Every record of `split`, in record order.

    Keys: image_emb [N, d], pooled [N, Dv] float32; birads, density (class 0..3),
    cancer int32 [N] (-1 unknown); index int32 [N] (record index); patient_id,
    image_id, study_id, laterality str [N]; in_birads_test_subset,
    in_density_test_subset int32 [N].
    """
    source = pipeline.open_split(data_cfg.dataset_dir, split) if source is None else source
    n = len(source)
    if n == 0:
        raise ValueError(f"{data_cfg.dataset_dir}: split {split!r} is empty")
    embed = image_embedder(model)
    batches = pipeline.eval_iterator(data_cfg, tok, split, batch_size=batch_size, source=source)
    total = pipeline.eval_batches_per_host(n, batch_size, 1)
    parts: dict[str, list] = {k: [] for k in ("image_emb", "pooled", "index", *LABELS)}
    for batch in tqdm(batches, total=total, desc=f"extract {split}", unit="batch"):
        emb, pooled = embed(jnp.asarray(batch["view1"]))
        keep = np.asarray(batch["valid"], bool)  # padding rows of the last batch
        parts["image_emb"].append(np.asarray(emb)[keep])
        parts["pooled"].append(np.asarray(pooled)[keep])
        for k in ("index", *LABELS):
            parts[k].append(np.asarray(batch[k], np.int32)[keep])
    out = in_record_order({k: np.concatenate(v) for k, v in parts.items()}, n, split)
    fields = record_fields(source, ID_FIELDS + FLAG_FIELDS)
    out.update({k: fields[k] for k in ID_FIELDS})
    out.update({k: fields[k].astype(np.int32) for k in FLAG_FIELDS})
    for k in ("image_emb", "pooled"):
        if not np.isfinite(out[k]).all():
            raise FloatingPointError(f"split {split!r}: non-finite values in {k}")
    return out


def embeddings_path(workdir: str, split: str) -> str:
    return os.path.join(workdir, f"embeddings_{split}.npz")


def run(cfg, workdir: str) -> dict:
    """Extract every split of cfg.splits; one npz per split, written as each finishes."""
    require_pretrain_workdir(cfg)
    if cfg.batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {cfg.batch_size}")
    splits = tuple(cfg.splits)
    if not splits:
        raise ValueError("config.splits is empty: name at least one split (e.g. 'test')")
    model, tok, step = restore.restore_model(cfg.pretrain_workdir)
    data_cfg = eval_data_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    result: dict = {"step": int(step), "dataset_dir": data_cfg.dataset_dir}
    for split in splits:
        arrays = extract_split(model, tok, data_cfg, split, cfg.batch_size)
        path = embeddings_path(workdir, split)
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
        logging.info("wrote %s (%d images)", path, len(arrays["index"]))
        result[f"n_{split}"] = int(len(arrays["index"]))
        result[f"path_{split}"] = path
    return result
