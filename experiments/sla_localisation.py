"""Does the symmetric local alignment (eq. 3) teach sentence maps to find what they describe?

The paper's Fig. 3 and Table 4 "w/o SLA" in miniature, on CPU: a synthetic EMBED-format
set where every image carries one mass with a box of at least ~2 x 2 patches
(`python -m data_prep synthetic --localisation`), configs/demo.py's tiny MaMA trained in
two arms (sla: eq. 4 as configured; nosla: w = 0 throughout, loss.use_local=False), on
several seeds, then scored on held-out images: per sentence kind the mean lift and the
pointing-game hit rate against chance (map_scores.roi_scores), plus zero-shot and linear-probe
figures. Settings are chosen with --split validation; the test split is for the final table.

  .venv/bin/python experiments/sla_localisation.py --work /tmp/sla --split validation
  .venv/bin/python experiments/sla_localisation.py --work /tmp/sla --split test

Diagnostic arms (issue 15, item 2): sep (SEP states instead of token means), visual / text
(one half of eq. 3), and --diagnostics (BatchNorm batch vs running statistics in the local
heads, and the global-identity test of sla_eval.identity). Each run trains in a child
process, one at a time; finished runs and their scores are reused (delete a run's folder
to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# arm -> config overrides on configs/demo.py (dotted keys)
ARMS = {
    "sla": {},
    "nosla": {"loss.use_local": False},          # Table 4 "w/o SLA": w = 0 throughout
    "sep": {"model.sentence_features": "sep"},   # the paper's sentence features
    "visual": {"loss.local_half": "visual"},      # only L^V of eq. 3 (c_v: max over patches)
    "text": {"loss.local_half": "text"},          # only L^T of eq. 3 (c_t: max over sentences)
}
RESULT = "sla_result_{split}.json"
# The sentences that describe the lesion in the localisation set: the mass itself, and the
# three whose BI-RADS wording differs between the breast with the mass (2-6) and without (1).
LESION_KINDS = ("The mass", "Findings", "Impressions", "Overall Assessment")


# ---------------------------------------------------------------------------- data

DEFAULT_LESION_SCALE = 2.0


def data_tag(lesion_scale: float) -> str:
    """Folder suffix of a localisation set other than the default one."""
    return "" if lesion_scale == DEFAULT_LESION_SCALE else f"_scale{lesion_scale:g}"


def make_dataset(work: Path, patients: int, seed: int, lesion_scale: float) -> str:
    """The localisation set under WORK (generated and built once); its TFDS folder."""
    tag = data_tag(lesion_scale)
    synthetic, dataset = work / f"synthetic{tag}", work / f"dataset{tag}"
    tfds_dir = dataset / "tfds" / "mammography" / "embed" / "1.0.0"
    if not (tfds_dir / "dataset_info.json").exists():
        py = sys.executable
        subprocess.run([py, "-m", "data_prep", "synthetic", "--out", str(synthetic),
                        "--patients", str(patients), "--seed", str(seed),
                        "--lesion-scale", f"{lesion_scale:g}", "--localisation"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        subprocess.run([py, "-m", "data_prep", "build", "--dataset", "embed",
                        "--tables", str(synthetic), "--images", str(synthetic),
                        "--out", str(dataset), "--workers", "2"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(tfds_dir)


# ---------------------------------------------------------------------------- one run

def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_config(dataset_dir: str, seed: int, overrides: dict, smoke: bool):
    """configs/demo.py (its `test` preset under --smoke) with the arm's and the command
    line's overrides."""
    from configs import demo

    cfg = demo.get_config("test" if smoke else None)
    cfg.seed = seed
    cfg.data.dataset_dir = dataset_dir
    cfg.train.eval_every = 0  # validation zero-shot during training: not needed here
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = cfg[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return cfg


def train_one(workdir: str, dataset_dir: str, seed: int, overrides: dict, smoke: bool) -> None:
    """Pretrain one run in this process (the child of `main`)."""
    from absl import logging

    from mama_jax.evaluate import during_training

    logging.set_verbosity(logging.WARNING)
    cfg = run_config(dataset_dir, seed, overrides, smoke)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config_pretrain.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))  # evaluation rebuilds the model from it
    during_training.pretrain(cfg, workdir)


def eval_one(workdir: str, split: str, diagnostics: bool, with_global: bool) -> None:
    from absl import logging

    from experiments import sla_eval

    logging.set_verbosity(logging.WARNING)
    result = sla_eval.evaluate_run(workdir, split, diagnostics=diagnostics, with_global=with_global)
    with open(os.path.join(workdir, RESULT.format(split=split)), "w") as f:
        json.dump(result, f, indent=2)


def _child(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True, cwd=ROOT)


def run_tag(settings) -> str:
    """Runs with other --set overrides get folders of their own, e.g. _delta0_steps1200."""
    return "".join(f"_{key.split('.')[-1]}{value}" for key, value in settings)


def ensure_run(args, dataset_dir: str, arm: str, seed: int) -> dict:
    """Train (unless finished) and score (unless scored) one arm x seed; its result."""
    tag = run_tag(args.set) + data_tag(args.lesion_scale)
    workdir = Path(args.work) / "runs" / f"{arm}{tag}_s{seed}"
    overrides = {**ARMS[arm], **dict(args.set)}
    if not (workdir / "DONE").exists():
        _child("_train", str(workdir), dataset_dir, str(seed), json.dumps(overrides),
               "1" if args.smoke else "0")
        (workdir / "DONE").write_text("trained\n")
    result = workdir / RESULT.format(split=args.split)
    if not result.exists():
        _child("_eval", str(workdir), args.split, "1" if args.diagnostics else "0",
               "0" if args.no_global else "1")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------- table

def _stats(values):
    import numpy as np

    v = np.asarray([x for x in values if x is not None], float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (float("nan"), 0.0)


def _fmt_row(name, values, pct=False):
    scale = 100.0 if pct else 1.0
    cells = ["   -  " if v is None else f"{scale * v:6.2f}" for v in values]
    mean, sd = _stats(values)
    return f"  {name:<34s}" + " ".join(cells) + f"   {scale * mean:6.2f} ± {scale * sd:5.2f}"


def table(results: dict, seeds, split: str) -> str:
    """One table: rows arm x (sentence kind | metric), a column per seed, then mean ± sd."""
    head = f"  {'':<34s}" + " ".join(f"{'s' + str(s):>6s}" for s in seeds) + "   mean ± sd"
    lines = [f"SLA localisation on the {split} split (held-out images with lesion boxes)", head]
    for arm, per_seed in results.items():
        runs = [per_seed[s] for s in seeds]
        lines.append(f"[{arm}]  n images {runs[0]['n_images']}, step {runs[0]['step']}")
        for section, label in (("maps", ""), ("maps_bn_batch", "BN batch stats: ")):
            if section not in runs[0]:
                continue
            kinds = list(dict.fromkeys(k for r in runs for k in r[section]))
            if section == "maps_bn_batch":  # the lesion sentences suffice for the contrast
                kinds = [k for k in kinds if k in LESION_KINDS]
            for kind in kinds:
                get = lambda r, m: r[section].get(kind, {}).get(m)  # noqa: E731
                lines.append(_fmt_row(f"{label}{kind}: lift", [get(r, "mean_lift") for r in runs]))
                lines.append(_fmt_row(f"{label}{kind}: hit %", [get(r, "hit_rate") for r in runs], True))
                lines.append(_fmt_row(f"{label}{kind}: chance %",
                                      [get(r, "chance_hit_rate") for r in runs], True))
        for section in ("identity", "global"):
            for key in (runs[0].get(section) or {}):
                lines.append(_fmt_row(key, [r[section][key] for r in runs]))
    return "\n".join(lines)


def must_hold(results: dict, seeds, kinds=LESION_KINDS) -> list[str]:
    """Issue 15's criterion per arm, seed and lesion sentence kind."""
    out = []
    for arm, per_seed in results.items():
        for kind in kinds:
            for s in seeds:
                m = per_seed[s]["maps"].get(kind)
                if m is None:
                    continue
                ok = m["hit_rate"] >= 2 * m["chance_hit_rate"] and m["mean_lift"] >= 1.3
                out.append(f"{arm} seed {s} {kind!r}: lift {m['mean_lift']:.2f}, hits "
                           f"{100 * m['hit_rate']:.0f} % vs {100 * m['chance_hit_rate']:.0f} % "
                           f"chance -> {'localises' if ok else 'does not localise'}"
                           " (lift >= 1.3 and hits >= 2x chance)")
    return out


# ---------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/sla_localisation", help="data and runs go here")
    p.add_argument("--split", default="validation", choices=("validation", "test"),
                   help="where the table is measured: choose settings on validation")
    p.add_argument("--arms", nargs="+", default=["sla", "nosla"], choices=sorted(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--patients", type=int, default=60)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--lesion-scale", type=float, default=DEFAULT_LESION_SCALE,
                   help="mass radius multiplier of the generated set (data_prep synthetic)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   type=str, help="config override for every arm, e.g. --set train.steps 800")
    p.add_argument("--diagnostics", action="store_true",
                   help="also BatchNorm batch statistics and the global-identity test")
    p.add_argument("--no-global", action="store_true", help="skip zero-shot and linear probe")
    p.add_argument("--smoke", action="store_true", help="a few steps at 56 px (the smoke test)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_train":
        workdir, dataset_dir, seed, overrides, smoke = argv[1:]
        train_one(workdir, dataset_dir, int(seed), json.loads(overrides), smoke == "1")
        return 0
    if argv and argv[0] == "_eval":
        eval_one(argv[1], argv[2], argv[3] == "1", argv[4] == "1")
        return 0
    args = _parser().parse_args(argv)
    args.set = [(k, _parse_value(v)) for k, v in args.set]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset_dir = make_dataset(work, args.patients, args.data_seed, args.lesion_scale)
    results = {arm: {s: ensure_run(args, dataset_dir, arm, s) for s in args.seeds}
               for arm in args.arms}
    print(table(results, args.seeds, args.split))
    print("\n".join(must_hold(results, args.seeds)))
    if args.out:
        Path(args.out).write_text(json.dumps({"split": args.split, "settings": args.set,
                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
