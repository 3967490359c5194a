"""Grain input pipeline: second view, augmentation, captions, batches (index: study_index.py).

Train chain (spec jax_stack.md §4): record indices -> global shuffle (reshuffled every
epoch) -> repeat -> random_map(make example) -> this host's block of each global batch
(HostBlock) -> threaded prefetch of examples -> batch. The random map sits before the
host split so each
example's rng is keyed by its global position: the same seed gives the same examples
whatever the host count, and no two hosts ever share an rng stream. Batching after the
prefetch lets all threads work on one batch (batching first would give each thread a
whole batch, and need num_threads batches in memory). Every random choice of an example
(second view, caption masking, both augmentations) comes from that one rng.

Threads, not processes: on few cores grain worker processes are slower (§4), and the
work here (libdeflate, cv2, tokenizers) mostly runs outside the GIL.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import threading
from typing import Sequence

import cv2
import grain
import numpy as np

from mama_jax.input import augment, captions, records
from mama_jax.input.augment import eval_transform, train_transform  # noqa: F401  (public API)
from mama_jax.input.tokenizer import TextTokenizer, encode_caption
from mama_jax.input.study_index import SECOND_VIEWS, index_fields, study_index  # noqa: F401 (public API)



# grey: uint16 [S, S], 2 bytes a pixel; the ViT normalises on the device (models/vit.py).
# rgb_float32: float32 [S, S, 3] in [-1, 1] normalised on the host (12 bytes a pixel).
TRANSFERS = ("grey", "rgb_float32")


def train_view(image_u16: np.ndarray, rng: np.random.Generator, cfg: "DataConfig") -> np.ndarray:
    """One augmented view in the form cfg.transfer names."""
    make = augment.train_view if cfg.transfer == "grey" else augment.train_transform
    return make(image_u16, cfg.image_size, rng, cfg)


def eval_view(image_u16: np.ndarray, cfg: "DataConfig") -> np.ndarray:
    """The eval view in the form cfg.transfer names."""
    make = augment.eval_view if cfg.transfer == "grey" else augment.eval_transform
    return make(image_u16, cfg.image_size)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset_dir: str                     # the TFDS version folder (data_prep build.dataset_dir)
    image_size: int = 518
    global_batch_size: int = 144
    max_length: int = 144                # tokens, BOS and EOS included
    second_view: str = "intra_study"     # one of SECOND_VIEWS (paper Table 5)
    p_self: float = 0.5                  # D16: P(second view = anchor re-augmented), intra_study / intra_side
    caption_style: str = "structured"    # captions.STYLES
    mask_prob: float = 0.8               # §3.2, training captions only
    seed: int = 0
    num_threads: int = 4
    prefetch: int = 2
    crop_scale: tuple = (0.1, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    blur_prob: float = 0.4
    blur_sigma: tuple = (0.1, 2.0)
    transfer: str = "grey"               # one of TRANSFERS: how a view travels to the device

    def __post_init__(self):
        if self.transfer not in TRANSFERS:
            raise ValueError(f"DataConfig.transfer {self.transfer!r} not in {TRANSFERS}")
        if self.second_view not in SECOND_VIEWS:
            raise ValueError(f"DataConfig.second_view {self.second_view!r} not in {SECOND_VIEWS}")
        if self.caption_style not in captions.STYLES:
            raise ValueError(f"DataConfig.caption_style {self.caption_style!r} not in {captions.STYLES}")
        for name in ("p_self", "mask_prob", "hflip", "vflip", "jitter_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("image_size", "global_batch_size", "num_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"DataConfig.max_length must be >= 2 (BOS + EOS), got {self.max_length}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"DataConfig.{name} must be (low, high) with 0 < low <= high, "
                                 f"got {getattr(self, name)}")
        if self.crop_scale[1] > 1:
            raise ValueError(f"DataConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")


def open_split(dataset_dir: str, split: str):
    """Random-access source of one split: source[i] -> dict of numpy (text as bytes)."""
    import tensorflow_datasets as tfds  # 0.6 s import; TensorFlow itself is never needed

    if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
        raise FileNotFoundError(f"{dataset_dir}: not a TFDS dataset folder (no dataset_info.json); "
                                "pass the version folder that data_prep build reports")
    builder = tfds.builder_from_directory(dataset_dir)
    available = sorted(builder.info.splits.keys())
    if split not in available:
        raise KeyError(f"{dataset_dir}: no split {split!r}; it has {', '.join(available) or 'none'}")
    return records.RecordSource(builder.as_data_source(split=split))


# ----------------------------------------------------------------------------- study index

def density_label(density: int) -> int:
    """Density task class: BI-RADS density 1..4 -> 0..3; anything else -> -1 (unknown)."""
    return density - 1 if density in captions.DENSITY_CLASSES else -1


def _labels(record: dict) -> dict:
    return {
        "birads": np.int32(record["birads"]),
        "density": np.int32(density_label(int(record["density"]))),
        "cancer": np.int32(record["cancer"]),
    }


def choose_second_view(anchor: int, candidates: np.ndarray, strategy: str, p_self: float,
                       rng: np.random.Generator) -> int:
    """Record index of the second view (§3.3, Table 5). `candidates` = study_index entry."""
    if strategy == "same_image":
        return anchor
    # The official code re-augments the anchor with p_self for the study and the side pair.
    if strategy in ("intra_study", "intra_side") and rng.random() < p_self:
        return anchor
    if len(candidates) == 0:  # a study (or side) with one image: the anchor re-augmented
        return anchor
    return int(candidates[rng.integers(len(candidates))])


class _Captioner:
    """Caption -> token arrays through a private tokenizer copy behind a lock.

    A fast tokenizer raises "Already borrowed" when one thread changes its settings
    while another encodes; the copy keeps the caller's own tokenizer calls out of it.
    """

    def __init__(self, tokenizer: TextTokenizer, max_length: int):
        if not isinstance(tokenizer, TextTokenizer):
            raise TypeError(f"tokenizer must be a TextTokenizer (models.tokenizer.load_tokenizer), "
                            f"got {type(tokenizer).__name__}")
        self.tokenizer = dataclasses.replace(tokenizer, hf=copy.deepcopy(tokenizer.hf))
        self.max_length = max_length
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for grain worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, caption: str) -> dict:
        with self._lock:
            enc = encode_caption(self.tokenizer, caption, self.max_length)
        return {"input_ids": enc.input_ids.astype(np.int32),
                "attention_mask": enc.attention_mask.astype(np.int32),
                "truncated": np.bool_(enc.truncated)}


class TrainExample:
    """random_map transform: record index + rng -> one training example."""

    def __init__(self, source: Sequence, candidates: list[np.ndarray], tokenizer: TextTokenizer,
                 cfg: DataConfig):
        if len(candidates) != len(source):
            raise ValueError(f"study index has {len(candidates)} entries for {len(source)} records")
        self.source, self.candidates, self.cfg = source, candidates, cfg
        self.captioner = _Captioner(tokenizer, cfg.max_length)

    def __call__(self, index, rng: np.random.Generator) -> dict:
        cfg, index = self.cfg, int(index)
        record = self.source[index]
        other = choose_second_view(index, self.candidates[index], cfg.second_view, cfg.p_self, rng)
        image2 = record["image"] if other == index else records.image_of(self.source, other)
        caption = captions.build_caption(record, style=cfg.caption_style,
                                         mask_prob=cfg.mask_prob, rng=rng)
        return {
            "view1": train_view(record["image"], rng, cfg),
            "view2": train_view(image2, rng, cfg),
            **self.captioner(caption),
            **_labels(record),
            "index": np.int32(index),
            "view2_index": np.int32(other),
        }


class EvalExample:
    """map transform: position in this host's padded eval order -> one eval example."""

    def __init__(self, source: Sequence, tokenizer: TextTokenizer | None, cfg: DataConfig,
                 process_index: int, process_count: int):
        self.source, self.cfg = source, cfg
        self.process_index, self.process_count = process_index, process_count
        self.captioner = None if tokenizer is None else _Captioner(tokenizer, cfg.max_length)

    def __call__(self, position) -> dict:
        index = self.process_index + int(position) * self.process_count
        valid = index < len(self.source)
        # Padding repeats a real record (no degenerate inputs reach the model), marked invalid.
        record = self.source[index if valid else 0]
        text = {}
        if self.captioner is not None:
            text = self.captioner(captions.build_caption(record, style=self.cfg.caption_style,
                                                         mask_prob=0.0))
        return {
            "view1": eval_view(record["image"], self.cfg),
            **text,
            **_labels(record),
            "index": np.int32(index if valid else -1),
            "valid": np.bool_(valid),
        }


def _check_hosts(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")


def _batched_iterator(ds: grain.MapDataset, cfg: DataConfig, batch_size: int,
                      drop_remainder: bool) -> grain.DatasetIterator:
    """Threads prefetch single examples (parallel within a batch); batches form on top.

    `cfg.prefetch` counts batches; grain needs a buffer of at least num_threads elements.
    """
    cv2.setNumThreads(0)  # cv2's own pool would fight grain's threads for the cores
    options = grain.ReadOptions(num_threads=cfg.num_threads,
                                prefetch_buffer_size=max(cfg.num_threads, cfg.prefetch * batch_size))
    return iter(ds.to_iter_dataset(options).batch(batch_size, drop_remainder=drop_remainder))


class HostBlock(grain.MapDataset):
    """This host's block of every global batch of a stream.

    Global batch k is stream elements [kB, (k+1)B); host p of P takes the
    contiguous block [kB + pb, kB + (p+1)b) with b = B / P. The global batch that
    jax assembles from the hosts' pieces (process order) is then the same,
    row for row, whatever the number of hosts: losses, dropout masks and the
    data position do not depend on the topology.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local
        self._length = len(parent) // global_batch * self._local

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._offset + row]


def train_dataset(cfg: DataConfig, tokenizer: TextTokenizer, *, process_index: int = 0,
                  process_count: int = 1, source: Sequence | None = None) -> grain.MapDataset:
    """This host's endless stream of train examples (unbatched MapDataset)."""
    _check_hosts(process_index, process_count)
    source = open_split(cfg.dataset_dir, "train") if source is None else source
    if len(source) == 0:
        raise ValueError(f"{cfg.dataset_dir}: the train split is empty")
    maker = TrainExample(source, study_index(source, cfg.second_view), tokenizer, cfg)
    ds = (grain.MapDataset.range(len(source))
          .seed(cfg.seed)
          .shuffle()
          .repeat()
          .random_map(maker))
    return HostBlock(ds, cfg.global_batch_size, process_index, process_count)


def train_iterator(cfg: DataConfig, tokenizer: TextTokenizer, *, process_index: int = 0,
                   process_count: int = 1, source: Sequence | None = None) -> grain.DatasetIterator:
    """Endless iterator of this host's train batches (global_batch_size // process_count).

    Batch: view1, view2 uint16 [B, S, S] (float32 [B, S, S, 3] with cfg.transfer
    rgb_float32); input_ids, attention_mask int32 [B, L];
    truncated bool [B]; birads, density (class 0..3), cancer int32 [B] (-1 unknown);
    index int32 [B] (record index in the train split); view2_index int32 [B] (record of
    the second view; == index for a self view). get_state()/set_state() resume exactly;
    see host_state_for() to resume on another number of hosts.
    """
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    ds = train_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count,
                       source=source)
    return _batched_iterator(ds, cfg, cfg.global_batch_size // process_count, drop_remainder=True)


def eval_batches_per_host(num_records: int, batch_size: int, process_count: int) -> int:
    """Batches every host yields for a split, so all hosts step together."""
    return math.ceil(math.ceil(num_records / process_count) / batch_size)


def eval_iterator(cfg: DataConfig, tokenizer: TextTokenizer | None, split: str, *, process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None,
                  source: Sequence | None = None) -> grain.DatasetIterator:
    """One pass over a split: eval transform, unmasked captions, each record exactly once.

    Host p takes records p, p + P, p + 2P, ...; the last batch is padded (a copy of
    record 0, index -1) and `valid` (bool [B]) marks the real rows. Keys: view1 (eval
    transform), input_ids, attention_mask, truncated, birads, density, cancer, index, valid;
    with tokenizer=None no captions are built (image-only evaluation) and the three text
    keys are absent.
    """
    _check_hosts(process_index, process_count)
    if batch_size is None:
        if cfg.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                             f"process_count {process_count}")
        batch_size = cfg.global_batch_size // process_count
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = open_split(cfg.dataset_dir, split) if source is None else source
    num_batches = eval_batches_per_host(len(source), batch_size, process_count)
    maker = EvalExample(source, tokenizer, cfg, process_index, process_count)
    ds = grain.MapDataset.range(num_batches * batch_size).map(maker)
    return _batched_iterator(ds, cfg, batch_size, drop_remainder=False)
