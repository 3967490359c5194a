"""Zero-shot on the validation split while pretraining runs.

`pretrain(cfg, workdir)` is the pretraining job (main's "pretrain" mode):
mama_jax.train.pretrain.train with a callback that, every `train.eval_every` optimizer
steps, scores zero-shot density, BI-RADS and cancer (each where the split has its labels)
with the live model on the run's mesh: no checkpoint is written or read. The keys it logs
are "val_zs/<task>/bacc" and "val_zs/<task>/auc". It runs the zero-shot job's own code
(zeroshot.evaluate_task) with that job's defaults, so a live figure equals what
configs/zeroshot.py gives on the validation split for a checkpoint of the same step.

Every process runs the evaluation (the encoders are collectives on the mesh); each ends
with the whole split's embeddings and the same scores, and only process 0 writes them.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from mama_jax import factory
from mama_jax.input import captions, pipeline
from mama_jax.evaluate import extract, zeroshot
from mama_jax.train import pretrain as pretraining, sharding  # `pretrain` is the job below

SPLIT = "validation"
TASKS = ("density", "birads", "cancer")
METRICS = {"bacc": "balanced_accuracy", "auc": "auc"}  # logged name -> metrics.summary key
# The zero-shot job's defaults (configs/zeroshot.py); no bootstrap: a curve needs no CI.
JOB_SETTINGS = dict(prefix="official", aggregate="image", double_softmax=False, max_length=0,
                    bootstrap=0, seed=0)


def pretrain(cfg, workdir: str) -> dict:
    """Pretraining with validation zero-shot every train.eval_every steps (0 = never)."""
    live = ValidationZeroShot.open(cfg, workdir) if cfg.train.get("eval_every", 0) else None
    return pretraining.train(cfg, workdir, evaluate=live)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"validation zero-shot: {message}", flush=True)


def _local(x: jax.Array) -> np.ndarray:
    """This process's copy of a replicated array (np.asarray refuses a multi-host one)."""
    return np.asarray(x.addressable_data(0))


def _global(x: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds whole (the prompts)."""
    return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def _labels_per_task(fields: dict, where: str) -> dict[str, np.ndarray]:
    """{task: labels} of the tasks the split has labels for; the others are named and skipped."""
    labels = {}
    for task in TASKS:
        try:
            labels[task] = zeroshot.task_labels(fields, task, where)
        except ValueError as err:
            _say(f"{task} skipped ({err})")
    return labels


class ValidationZeroShot:
    """Callable (run, step) -> {"val_zs/<task>/<bacc|auc>": value} on the live state."""

    def __init__(self, cfg, workdir: str, source, fields: dict, labels: dict):
        self.cfg, self.workdir, self.source, self.labels = cfg, workdir, source, labels
        self.data_cfg = factory.data_config(cfg)
        self.records = [{k: fields[k][i] for k in captions.RECORD_KEYS} for i in range(len(source))]
        self.ids = {k: fields[k] for k in extract.ID_FIELDS}
        # Prompts go in batches of the global batch: it divides evenly over the mesh.
        self.settings = ml_collections.ConfigDict(
            dict(JOB_SETTINGS, batch_size=cfg.data.global_batch_size))
        self._compiled = None  # (tokenizer, image encoder, text encoder), built at the first call
        self._reported: set[str] = set()  # undefined metrics and truncated prompts, said once

    @classmethod
    def open(cls, cfg, workdir: str) -> "ValidationZeroShot | None":
        """The evaluator of the run's dataset, or None (with a one-line reason) when its
        validation split is missing or empty or no task has labels there."""
        dataset_dir = factory.data_config(cfg).dataset_dir
        try:
            source = pipeline.open_split(dataset_dir, SPLIT)
        except KeyError as err:
            _say(f"off ({err.args[0]})")
            return None
        if len(source) == 0:
            _say(f"off ({dataset_dir}: the {SPLIT} split is empty)")
            return None
        keys = tuple(dict.fromkeys(captions.RECORD_KEYS + extract.ID_FIELDS + TASKS))
        fields = extract.record_fields(source, keys)
        labels = _labels_per_task(fields, f"{dataset_dir} split {SPLIT!r}")
        if not labels:
            _say("off (no task has labels in the validation split)")
            return None
        return cls(cfg, workdir, source, fields, labels)

    def _build(self, graphdef, mesh):
        """Tokenizer and the two jitted encoders: once per run, each later state reuses them."""
        replicated = sharding.replicated(mesh)  # every process reads the whole result
        embed_images = extract.image_embed_fn(graphdef)
        images_fn = jax.jit(lambda state, images, index: (embed_images(state, images)[0], index),
                            out_shardings=replicated)
        text_fn = zeroshot.text_embed_fn(graphdef, out_shardings=replicated)
        return factory.tokenizer(self.cfg, self.workdir), images_fn, text_fn

    def _image_embeddings(self, images_fn, state, mesh) -> np.ndarray:
        """e_I(x) [N, d] of every validation record, in record order (eval transform)."""
        n_proc, proc = jax.process_count(), jax.process_index()
        batches = pipeline.eval_iterator(self.data_cfg, None, SPLIT, process_index=proc,
                                     process_count=n_proc, source=self.source)
        embs, indices = [], []
        for batch in batches:
            inputs = sharding.shard_batch({k: batch[k] for k in ("view1", "index")}, mesh)
            emb, index = images_fn(state, inputs["view1"], inputs["index"])
            embs.append(_local(emb))
            indices.append(_local(index))
        emb, index = np.concatenate(embs), np.concatenate(indices)
        keep = index >= 0  # padding rows of the last batch
        rows = extract.in_record_order({"image_emb": emb[keep], "index": index[keep]},
                                       len(self.source), SPLIT)
        return rows["image_emb"]

    def __call__(self, run, step: int) -> dict[str, float]:
        model = run.model()
        graphdef, state = nnx.split(model)
        if self._compiled is None:
            self._compiled = self._build(graphdef, run.mesh)
        tok, images_fn, text_fn = self._compiled
        batch_sharding = sharding.batch_sharding(run.mesh, 2)

        def embed_texts(ids, mask):  # the text tower trains: prompts are encoded every time
            return _local(text_fn(state, _global(ids, batch_sharding), _global(mask, batch_sharding)))

        arrays = dict(self.ids, image_emb=self._image_embeddings(images_fn, state, run.mesh),
                      index=np.arange(len(self.source)))
        logit_scale = zeroshot.training_logit_scale(float(_local(model.logit_scale[...])),
                                                    self.cfg)
        max_length = zeroshot.prompt_max_length(self.settings, self.cfg, model)
        cache: dict = {}  # prompts shared between tasks are encoded once
        scores = {}
        for task, labels in self.labels.items():
            entry, _ = zeroshot.evaluate_task(task, labels, arrays, self.records, model, tok,
                                              self.settings, max_length, logit_scale, cache,
                                              text_embed=embed_texts, progress=False)
            if entry["truncated_prompts"]:
                self._say_once(task, f"{task}: {entry['truncated_prompts']} prompts truncated "
                               f"to data.max_length={max_length} tokens (class sentences may be cut)")
            for name, key in METRICS.items():
                scores[f"val_zs/{task}/{name}"] = float(entry["metrics"][key])
        return self._finite(scores, step)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            _say(message)
            self._reported.add(key)

    def _finite(self, scores: dict, step: int) -> dict:
        """The defined scores; an undefined one (AUC with one class present) is named once
        and left out, so metrics.jsonl stays strict JSON."""
        for name in sorted(k for k, v in scores.items() if not np.isfinite(v)):
            self._say_once(name, f"{name} undefined at step {step} (one class in the split?); "
                           "not logged")
        return {k: v for k, v in scores.items() if np.isfinite(v)}
