"""CLI: `python -m data_prep synthetic ...` and `python -m data_prep build ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep",
                                description="Offline mammography data preparation (no JAX).")
    sub = p.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", help="write a synthetic EMBED-format dataset (tables + DICOMs)")
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--patients", type=int, default=40)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--height", type=int, default=640, help="image rows")
    syn.add_argument("--width", type=int, default=512, help="image columns")
    syn.add_argument("--lesion-scale", type=float, default=1.0,
                     help="mass radius multiplier (the demo draws them larger: see "
                          "synthetic.generate)")
    syn.add_argument("--localisation", action="store_true",
                     help="one mass with a large box on every image, no calcifications "
                          "(experiments/sla_localisation.py)")

    b = sub.add_parser("build", help="tables + DICOMs -> TFDS ArrayRecord dataset")
    b.add_argument("--dataset", required=True, choices=("embed", "rsna", "vindr"))
    b.add_argument("--tables", required=True, help="folder with the dataset's CSV tables")
    b.add_argument("--images", required=True, help="root folder of the DICOM files")
    b.add_argument("--out", required=True, help="output folder (dataset, cache, manifest)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding processes (default: all cores)")
    b.add_argument("--long-side", type=int, default=1036,
                   help="resize so the long side is at most this many pixels")
    b.add_argument("--voi", choices=("none", "window"), default="none",
                   help="'window' applies the file's VOI LUT / window (LINEAR or SIGMOID)")
    b.add_argument("--j2k-reduce", choices=("on", "off"), default="on",
                   help="'on' decodes JPEG 2000 at the coarsest resolution level that keeps "
                        "--long-side pixels on the breast crop (the level goes in the "
                        "manifest); 'off' decodes every file at full resolution")
    b.add_argument("--seed", type=int, default=0, help="seed of a new patient split")
    b.add_argument("--splits", default=None,
                   help="split file to reuse or create (default OUT/splits.json)")
    b.add_argument("--no-scan", action="store_true",
                   help="do not list DICOMs under --images that the tables do not name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synthetic":
        from data_prep import synthetic

        summary = synthetic.generate(args.out, patients=args.patients, seed=args.seed,
                                     image_size=(args.height, args.width),
                                     lesion_scale=args.lesion_scale,
                                     localisation=args.localisation)
        print(json.dumps({"out": os.path.abspath(args.out), **summary}))
        return 0
    from data_prep import build

    summary = build.build(args.dataset, args.tables, args.images, args.out,
                          workers=args.workers, long_side=args.long_side, voi=args.voi,
                          seed=args.seed, splits_file=args.splits,
                          scan_images=not args.no_scan, j2k_reduce=args.j2k_reduce == "on")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
