"""One Markdown report of whatever evaluation results a workdir holds.

Reads (each optional; a missing one is reported as "not run"):
  zeroshot.json + zeroshot_<task>_<split>.npz  (zeroshot job; the npz gives ROC curves)
  linear_probe.json                           (linear_probe job)
  finetune_<task>.json                        (finetune job: the FFT column)
  sgd_probe_<task>_<pct>pct.json              (finetune job, protocol linear: the paper's
                                               SGD probe, in the LP columns, own rows)
  maps/maps.json                              (maps job)
  metrics.jsonl                               (pretraining losses: the workdir's own, else
                                               config.pretrain_workdir's, else that of the
                                               pretraining run named in a config_<job>.json)
Writes WORKDIR/report.md and its figures under WORKDIR/report/. Tables follow the
paper's layout (Tables 1-3): bACC / AUC in %, 95 % bootstrap intervals in brackets.

  python -m mama_jax.main --config=configs/report.py --workdir=runs/eval
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from mama_jax.input import captions
from mama_jax.evaluate import report_tables as tables
from mama_jax.evaluate.figures import (LOSS_TERMS, confusion_png, loss_png, roc_png,
                                       val_zeroshot_png, val_zeroshot_series)
from mama_jax.train import metrics_log

REPORT_MD = "report.md"
FIG_DIR = "report"


# ----------------------------------------------------------------------------- reading

def _load_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err


def _fft_results(workdir: str) -> dict:
    """{task: entry} of the finetune job's finetune_<task>.json files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "finetune_*.json"))):
        out.update(tables.tasks(_load_json(path)))
    return out


def _sgd_probe_results(workdir: str) -> dict:
    """{task: {percent: entry}} of the SGD probe's sgd_probe_<task>_<pct>pct.json files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "sgd_probe_*.json"))):
        result = _load_json(path)
        for task, entry in tables.tasks(result).items():
            out.setdefault(task, {})[round(100 * float(result["train_fraction"]), 6)] = entry
    return out


def find_metrics_jsonl(workdir: str, pretrain_workdir: str = "") -> str | None:
    candidates = [workdir, pretrain_workdir]
    for path in sorted(glob.glob(os.path.join(workdir, "config_*.json"))):
        try:
            with open(path) as f:
                candidates.append(json.load(f).get("pretrain_workdir", ""))
        except (OSError, ValueError, AttributeError):
            continue  # a config we cannot read just gives no hint
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "metrics.jsonl")):
            return os.path.join(folder, "metrics.jsonl")
    return None


read_metrics_jsonl = metrics_log.read_metrics_file


def _rel(path: str, workdir: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, workdir) if path.startswith(os.path.abspath(workdir) + os.sep) else path


def _figures(zs_json: dict | None, zs: dict, lp: dict, workdir: str, fig_dir: str) -> list[str]:
    out, split = [], (zs_json or {}).get("split", "test")
    aggregate = (zs_json or {}).get("aggregate", "image")
    for task in captions.TASKS:
        names = list(captions.CLASS_NAMES[task])
        sources = [("zeroshot", "zero-shot", zs.get(task))]
        fractions = tables.lp_fractions(lp.get(task, {}))
        for f in sorted(fractions):
            sources.append((f"lp{f:g}", f"linear probe {f:g}%", tables.lp_split(fractions[f])))
        for key, label, entry in sources:
            metrics, _ = tables.block(entry)
            if metrics.get("confusion"):
                path = confusion_png(metrics["confusion"], metrics.get("class_names") or names,
                                     os.path.join(fig_dir, f"confusion_{task}_{key}.png"),
                                     f"{task} {label}: confusion (n={metrics.get('n', '?')})")
                out.append(f"![{task} {label} confusion]({_rel(path, workdir)})")
        npz = os.path.join(workdir, f"zeroshot_{task}_{split}.npz")
        if task in zs and os.path.isfile(npz):
            with np.load(npz) as z:
                if "probs" in z.files and "label" in z.files:
                    path = roc_png(z["label"], z["probs"], names,
                                   os.path.join(fig_dir, f"roc_{task}_zeroshot.png"),
                                   f"{task} zero-shot ROC (per image; table: {aggregate})")
                    if path:
                        out.append(f"![{task} zero-shot ROC]({_rel(path, workdir)})")
        elif task in zs:
            out.append(f"(no ROC for {task} zero-shot: per-image probabilities "
                       f"zeroshot_{task}_{split}.npz not found)")
    return (["## Figures", ""] + [line + "\n" for line in out]) if out else []


def _num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if tables.finite(value) else "n/a"


def _pct(value) -> str:
    return f"{100 * value:.0f}%" if tables.finite(value) else "n/a"


def _maps_section(maps_json: dict | None, workdir: str) -> list[str]:
    out = ["## Sentence-to-patch similarity maps (Fig. 3)", ""]
    if not maps_json:
        return out + [f"Similarity maps: {tables.NOT_RUN} (no maps/maps.json).", ""]
    out.append("Cosine between the sentence's local text embedding and each patch's local "
               "image embedding, upsampled and normalised to [0, 1] per map (jet: red = most "
               f"similar). Checkpoint step {maps_json.get('checkpoint_step', '?')}, "
               f"split {maps_json.get('split', '?')}.")
    out.append("")
    summary = maps_json.get("roi_summary") or {}
    if summary:
        out += ["How well each sentence's map lights up the lesion boxes (white): lift = mean "
                "heat in the boxes / mean heat over the breast (1 = no preference); pointing "
                "hit = the map's hottest breast patch touches a box (chance: random maps).", "",
                "| Sentence | Images | Mean lift | Median lift | Pointing hits | Chance | "
                "Mean peak percentile |", "|---|---|---|---|---|---|---|"]
        for query, v in summary.items():
            out.append(f"| {query} | {v.get('n', 0)} | {_num(v.get('mean_lift'))} | "
                       f"{_num(v.get('median_lift'))} | {_pct(v.get('hit_rate'))} | "
                       f"{_pct(v.get('chance_hit_rate'))} | {_num(v.get('mean_peak_percentile'), 1)} |")
        out.append("")
    for m in maps_json.get("maps", []):
        lo, hi = m.get("min"), m.get("max")
        rng = f"cosine {lo:.3f}..{hi:.3f}" if tables.finite(lo) and tables.finite(hi) else ""
        roi = m.get("roi") or {}
        if tables.finite(roi.get("lift")):
            rng += f", lesion lift {roi['lift']:.2f}, peak rank {roi.get('peak_rank', '?')}"
        out.append(f"**{m.get('image_id', '?')}**: \"{m.get('sentence', '')}\" {rng}\n")
        if m.get("png"):
            out.append(f"![{m.get('query', 'map')}]({_rel(m['png'], workdir)})\n")
    for s in maps_json.get("skipped", []):
        out.append(f"- skipped {s.get('image_id', '?')} / {s.get('query', '?')}: {s.get('reason', '')}")
    return out + [""]


def _last_val_zeroshot(series: dict) -> str:
    """"Step S: density bACC / AUC, ..." of the last evaluated step of each task."""
    parts = []
    for task, points in sorted(series.get("bacc", {}).items()):
        step, bacc = points[-1]
        auc = dict(series.get("auc", {}).get(task, [])).get(step)
        parts.append(f"{task} {tables.pct(bacc)} / {tables.pct(auc)} (step {step})")
    return "; ".join(parts)


def _val_zeroshot_section(rows: dict, workdir: str, fig_dir: str) -> tuple[list[str], str | None]:
    """(lines, figure) of pretraining's validation zero-shot curves, or a "not run" line."""
    path = val_zeroshot_png(rows, os.path.join(fig_dir, "val_zeroshot.png")) if rows else None
    if not path:
        return [f"Validation zero-shot during pretraining: {tables.NOT_RUN} (no val_zs/ keys in "
                "metrics.jsonl; set train.eval_every).", ""], None
    return ["Zero-shot bACC / AUC (%) on the validation split, computed while pretraining ran "
            "with the live model every train.eval_every steps (the zero-shot job's prompts and "
            "rules; keys val_zs/<task>/<metric> in metrics.jsonl and TensorBoard).", "",
            f"![validation zero-shot]({_rel(path, workdir)})", "",
            f"Last: {_last_val_zeroshot(val_zeroshot_series(rows))}.", ""], path


# ----------------------------------------------------------------------------- job

def run(cfg, workdir: str) -> dict:
    """Write WORKDIR/report.md (+ figures in WORKDIR/report/) from the results present."""
    workdir = os.path.abspath(workdir)
    fig_dir = os.path.join(workdir, FIG_DIR)
    os.makedirs(fig_dir, exist_ok=True)
    zs_json = _load_json(os.path.join(workdir, "zeroshot.json"))
    lp_json = _load_json(os.path.join(workdir, "linear_probe.json"))
    maps_json = _load_json(os.path.join(workdir, "maps", "maps.json"))
    metrics_path = find_metrics_jsonl(workdir, cfg.get("pretrain_workdir", ""))
    zs, lp, fft = tables.tasks(zs_json), tables.tasks(lp_json), _fft_results(workdir)
    sgd = _sgd_probe_results(workdir)

    lines = [f"# {cfg.get('title', '') or 'MaMA evaluation report'}", "", "## Inputs", ""]
    for name, present, what in (
            ("zeroshot.json", zs_json is not None, f"tasks {', '.join(zs) or 'none'}"),
            ("linear_probe.json", lp_json is not None, f"tasks {', '.join(lp) or 'none'}"),
            ("finetune_<task>.json", bool(fft), f"tasks {', '.join(fft)}"),
            ("sgd_probe_<task>_<pct>pct.json", bool(sgd), ", ".join(
                f"{t} {', '.join(f'{p:g}%' for p in sorted(v))}" for t, v in sgd.items())),
            ("maps/maps.json", maps_json is not None,
             f"{len((maps_json or {}).get('maps', []))} maps"),
            ("metrics.jsonl (pretraining)", metrics_path is not None, metrics_path or "")):
        lines.append(f"- {name}: {what if present else tables.NOT_RUN}")
    for key, label in (("step", "zero-shot checkpoint step"), ("prefix", "zero-shot prompt prefix"),
                       ("aggregate", "zero-shot aggregation"), ("split", "zero-shot split")):
        if isinstance(zs_json, dict) and key in zs_json:
            lines.append(f"- {label}: {zs_json[key]}")
    lines.append("")

    if zs or lp or fft or sgd:
        lines += tables.results_tables(zs, lp, fft, sgd) + tables.per_class(zs, lp)
    else:
        lines += ["## Results", "", f"Zero-shot: {tables.NOT_RUN}. Linear probe: {tables.NOT_RUN}. "
                  f"Fine-tune: {tables.NOT_RUN}.", ""]
    lines += _figures(zs_json, zs, lp, workdir, fig_dir)

    lines += ["## Pretraining losses and validation zero-shot", ""]
    loss_path, rows = None, {}
    if metrics_path:
        rows = read_metrics_jsonl(metrics_path)
        loss_path = loss_png(rows, os.path.join(fig_dir, "losses.png")) if rows else None
        if loss_path:
            last = rows[max(rows)]
            terms = ", ".join(f"{t} {last[t]:.4f}" for t in LOSS_TERMS if tables.finite(last.get(t)))
            lines += [f"![pretraining losses]({_rel(loss_path, workdir)})", "",
                      f"Step {max(rows)}: {terms}.", ""]
    if not loss_path:
        lines += [f"Loss curves: {tables.NOT_RUN} (no metrics.jsonl with loss terms found).", ""]
    val_lines, val_path = _val_zeroshot_section(rows, workdir, fig_dir)
    lines += val_lines
    lines += _maps_section(maps_json, workdir)

    path = os.path.join(workdir, REPORT_MD)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    figures = sorted(glob.glob(os.path.join(fig_dir, "*.png")))
    return {"report": path, "zeroshot_tasks": len(zs), "linear_probe_tasks": len(lp),
            "finetune_tasks": len(fft), "sgd_probe_tasks": len(sgd),
            "maps": len((maps_json or {}).get("maps", [])), "loss_curves": int(loss_path is not None),
            "val_zeroshot_curves": int(val_path is not None),
            "figures": len(figures)}
