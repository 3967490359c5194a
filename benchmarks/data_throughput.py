"""Input pipeline throughput: mama_jax.input.pipeline.train_iterator examples/s by image size
and threads, before and after issue 16, with the bytes of a batch. Three paths:

  before  TFDS's own record decode (zlib), views sent as float32 [S, S, 3] (transfer rgb_float32)
  grey    TFDS's decode, views sent as uint16 [S, S] (grey: normalised on the device)
  after   input/records.py's decode (libdeflate; a second view decodes its image only), grey

  python benchmarks/data_throughput.py                         # builds a synthetic dataset first
  python benchmarks/data_throughput.py --dataset-dir OUT/tfds/mammography/embed/1.0.0

Prints, per record: read + decode time alone for both readers (and the raw ArrayRecord read
by itself), the train augmentation time of one view at each size and caption + tokenisation
time; then train_iterator examples/s (one example = two augmented views + a tokenised
caption) for each --image-sizes x --threads, after a warm-up batch, the paths interleaved
--repeats times (a busy host slows all alike), medians and the after / before ratio.
The synthetic dataset is built from data_prep.synthetic phantoms at --phantom-size,
cropped and resized to a long side of 1036 (the default record size).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep import build, synthetic  # noqa: E402
from mama_jax.input import captions, pipeline, tokenizer as tok_lib  # noqa: E402


def make_dataset(work: str, patients: int, phantom_size: tuple[int, int]) -> str:
    """Synthetic EMBED tables + DICOMs -> TFDS dataset under work; returns the version folder."""
    raw, out = os.path.join(work, "raw"), os.path.join(work, "out")
    t0 = time.perf_counter()
    synthetic.generate(raw, patients=patients, seed=0, image_size=phantom_size)
    summary = build.build("embed", raw, raw, out, workers=os.cpu_count() or 1, long_side=1036)
    print(f"built a synthetic dataset: {summary['written']} images "
          f"({summary['splits']}) in {time.perf_counter() - t0:.0f} s")
    return build.dataset_dir(out, "embed")


def tokenizer_for(source, folder: str) -> tok_lib.TextTokenizer:
    """A tiny BPE on the split's captions, as the demo does (BioMedLM's needs the hub)."""
    texts = [captions.build_caption(source[i], style="structured_nomask") for i in range(len(source))]
    return tok_lib.load_tokenizer(tok_lib.build_tiny_tokenizer(folder, texts, vocab_size=1000))


# path -> (reader, transfer); reader "tfds" is TFDS's decode, "records" input/records.py's
PATHS = {"before": ("tfds", "rgb_float32"), "grey": ("tfds", "grey"), "after": ("records", "grey")}


def reader(source, name: str):
    return source.tfds_source if name == "tfds" else source


def per_record_costs(source, tok, image_sizes, n: int) -> None:
    n = min(n, len(source))
    t0 = time.perf_counter()
    nbytes = sum(len(source.data_source[i]) for i in range(n))  # serialised record bytes only
    raw_ms = (time.perf_counter() - t0) / n * 1e3
    for name, what in (("tfds", "TFDS decode"), ("records", "input/records.py")):
        src = reader(source, name)
        t0 = time.perf_counter()
        records = [src[i] for i in range(n)]
        read_ms = (time.perf_counter() - t0) / n * 1e3
        shapes = np.array([r["image"].shape for r in records])
        print(f"read + decode ({what}): {read_ms:.1f} ms/record ({1e3 / read_ms:.0f} records/s, "
              f"one thread; {n} records, mean image {shapes[:, 0].mean():.0f} x "
              f"{shapes[:, 1].mean():.0f} uint16, {nbytes / n / 1e6:.2f} MB stored)")
    t0 = time.perf_counter()
    for i in range(n):
        source.image(i)
    print(f"image alone (input/records.py, a second view): "
          f"{(time.perf_counter() - t0) / n * 1e3:.1f} ms/record; the ArrayRecord read alone "
          f"{raw_ms:.1f} ms")
    rng = np.random.default_rng(0)
    for size in image_sizes:
        for transfer in ("rgb_float32", "grey"):
            cfg = pipeline.DataConfig(dataset_dir="", image_size=size, transfer=transfer)
            t0 = time.perf_counter()
            for r in records:
                pipeline.train_view(r["image"], rng, cfg)
            print(f"augment one view @{size} ({transfer}): "
                  f"{(time.perf_counter() - t0) / n * 1e3:.1f} ms")
    t0 = time.perf_counter()
    for r in records:
        tok_lib.encode_caption(tok, captions.build_caption(r, mask_prob=0.8, rng=rng), 144)
    print(f"caption + tokenise: {(time.perf_counter() - t0) / n * 1e3:.2f} ms")


def iterator_rate(dataset_dir: str, tok, size: int, threads: int, batch: int, batches: int,
                  path: str) -> tuple[float, int]:
    """(examples/s, bytes of the batch's arrays) of train_iterator after a warm-up batch."""
    name, transfer = PATHS[path]
    cfg = pipeline.DataConfig(dataset_dir=dataset_dir, image_size=size, global_batch_size=batch,
                              max_length=144, num_threads=threads, prefetch=2, transfer=transfer)
    source = reader(pipeline.open_split(dataset_dir, "train"), name)
    it = pipeline.train_iterator(cfg, tok, source=source)
    next(it)  # opens the source, builds the study index, starts the threads
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    seconds = time.perf_counter() - t0
    want = (batch, size, size) + ((3,) if transfer == "rgb_float32" else ())
    if b["view1"].shape != want:
        raise RuntimeError(f"train_iterator gave view1 {b['view1'].shape}, expected {want}")
    return batches * batch / seconds, sum(v.nbytes for v in b.values())


def compare_paths(dataset_dir: str, tok, size: int, threads: int, args) -> None:
    """The PATHS, interleaved args.repeats times; medians."""
    rates = {p: [] for p in PATHS}
    nbytes = {}
    for _ in range(args.repeats):
        for path in PATHS:
            rate, nbytes[path] = iterator_rate(dataset_dir, tok, size, threads, args.batch,
                                               args.batches, path)
            rates[path].append(rate)
    cores = min(threads, os.cpu_count() or 1)
    med = {p: float(np.median(r)) for p, r in rates.items()}
    for path, (name, transfer) in PATHS.items():
        print(f"  @{size} px, {threads} thread(s), {path:>6} ({name} + {transfer}): "
              f"{med[path]:.1f} examples/s, {med[path] / cores:.1f} examples/s/core, "
              f"{nbytes[path] / 2 ** 20:.1f} MiB per batch of {args.batch} "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates[path])})")
    print(f"  @{size} px, {threads} thread(s): after / before = "
          f"{med['after'] / med['before']:.2f}x examples/s/core (grey transfer alone "
          f"{med['grey'] / med['before']:.2f}x), {nbytes['before'] / nbytes['after']:.2f}x fewer "
          f"bytes per batch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", help="a TFDS version folder from `python -m data_prep build`")
    p.add_argument("--patients", type=int, default=8, help="synthetic patients (without --dataset-dir)")
    p.add_argument("--phantom-size", type=int, nargs=2, default=(1280, 1024), metavar=("H", "W"))
    p.add_argument("--image-sizes", type=int, nargs="+", default=(518, 112))
    p.add_argument("--threads", type=int, nargs="+", default=(1, 2, 4))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    p.add_argument("--records", type=int, default=32, help="records for the per-record timings")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each transfer")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as work:
        dataset_dir = args.dataset_dir or make_dataset(work, args.patients, tuple(args.phantom_size))
        source = pipeline.open_split(dataset_dir, "train")
        tok = tokenizer_for(source, os.path.join(work, "tokenizer"))
        print(f"dataset: {dataset_dir} ({len(source)} train records); {os.cpu_count()} CPU cores")
        per_record_costs(source, tok, args.image_sizes, args.records)
        print(f"train_iterator, batch {args.batch}, {args.batches} batches after a warm-up batch:")
        for size in args.image_sizes:
            for threads in args.threads:
                compare_paths(dataset_dir, tok, size, threads, args)


if __name__ == "__main__":
    main()
