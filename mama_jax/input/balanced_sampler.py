"""Fine-tune input: class-balanced draws (spec §4.2) and augmented train batches.

The official run uses PyTorch's WeightedRandomSampler with weight 1 / count[class]
per image, with replacement. Under those weights every present class carries the same
total mass, so a draw is equivalently: a class uniformly among the present classes,
then an image uniformly within it. That is O(1) per draw and gives the same
distribution; images without a label (-1) have weight 0.

Every draw and every augmentation is a function of (seed, step, position in the global
batch), so a resumed run sees exactly the batches the straight run saw, with no
input-pipeline state in the checkpoint, whatever the host count.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import grain
import numpy as np

from mama_jax.input import pipeline

_DRAW, _AUGMENT = 0, 1  # separate random streams for choosing images and augmenting them


class BalancedSampler:
    """Record indices drawn with probability proportional to 1 / count[label]."""

    def __init__(self, labels, seed: int):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"BalancedSampler: labels must be int [N]; got {labels.dtype} "
                             f"{labels.shape}")
        classes = np.unique(labels[labels >= 0])
        if classes.size == 0:
            raise ValueError("BalancedSampler: no labelled records (all labels are -1)")
        self.seed = int(seed)
        self.classes = classes
        self.members = [np.flatnonzero(labels == c) for c in classes]
        self.counts = np.array([len(m) for m in self.members])

    def probabilities(self, num_records: int) -> np.ndarray:
        """P(record i) of one draw, [num_records] (for checks and reports)."""
        p = np.zeros(num_records)
        for m in self.members:
            p[m] = 1.0 / (len(self.classes) * len(m))
        return p

    def indices(self, step: int, batch_size: int) -> np.ndarray:
        """The global batch of `step`: batch_size record indices, with replacement."""
        rng = np.random.default_rng([self.seed, _DRAW, int(step)])
        which = rng.integers(len(self.classes), size=batch_size)
        within = rng.integers(self.counts[which])  # per draw: uniform in its class
        return np.array([self.members[c][j] for c, j in zip(which, within)], np.int64)


class _TrainExample:
    """map transform: element e of this host's stream -> one augmented example."""

    def __init__(self, source: Sequence, labels: np.ndarray, sampler: BalancedSampler,
                 cfg: pipeline.DataConfig, per_host: int, process_index: int):
        self.source, self.labels, self.sampler, self.cfg = source, labels, sampler, cfg
        self.per_host, self.process_index = per_host, process_index

    def __call__(self, element) -> dict:
        step, j = divmod(int(element), self.per_host)
        position = self.process_index * self.per_host + j  # hosts own consecutive batch slices
        index = int(self.sampler.indices(step, self.cfg.global_batch_size)[position])
        rng = np.random.default_rng([self.sampler.seed, _AUGMENT, step, position])
        image = pipeline.train_view(self.source[index]["image"], rng, self.cfg)
        return {"image": image, "label": np.int32(self.labels[index]), "index": np.int32(index)}


def train_batches(cfg: pipeline.DataConfig, source: Sequence, labels: np.ndarray,
                  sampler: BalancedSampler, start_step: int, steps: int, *,
                  process_index: int = 0, process_count: int = 1):
    """This host's batches for steps start_step .. steps-1: image (pipeline.train_view's form),
    label int32 [b], index int32 [b], b = cfg.global_batch_size // process_count."""
    if cfg.global_batch_size % process_count:
        raise ValueError(f"batch size {cfg.global_batch_size} is not divisible by the "
                         f"{process_count} hosts")
    if len(labels) != len(source):
        raise ValueError(f"{len(labels)} labels for {len(source)} records")
    per_host = cfg.global_batch_size // process_count
    maker = _TrainExample(source, labels, sampler, cfg, per_host, process_index)
    ds = grain.MapDataset.range(start_step * per_host, steps * per_host).map(maker)
    cv2.setNumThreads(0)  # grain's threads already use the cores
    options = grain.ReadOptions(num_threads=cfg.num_threads,
                                prefetch_buffer_size=max(cfg.num_threads, cfg.prefetch * per_host))
    return iter(ds.to_iter_dataset(options).batch(per_host, drop_remainder=True))


def with_batch(cfg: pipeline.DataConfig, batch_size: int, seed: int, num_threads: int) -> pipeline.DataConfig:
    """The pretraining run's DataConfig (image size, augmentation) at the fine-tune batch."""
    return dataclasses.replace(cfg, global_batch_size=batch_size, seed=seed, num_threads=num_threads)
