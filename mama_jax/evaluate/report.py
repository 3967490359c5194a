"""One Markdown report of whatever evaluation results a workdir holds.

Reads (each optional; a missing one is reported as "not run"):
  zeroshot.json + zeroshot_<task>_<split>.npz  (zeroshot job; the npz gives ROC curves)
  linear_probe.json                           (linear_probe job)
  finetune_<task>.json                        (finetune job: the FFT column)
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
import math
import os

import numpy as np

from mama_jax import captions
from mama_jax import metrics as metrics_file
from mama_jax.evaluate.figures import (LOSS_TERMS, confusion_png, loss_png, roc_png,
                                       val_zeroshot_png, val_zeroshot_series)

REPORT_MD = "report.md"
FIG_DIR = "report"
NOT_RUN = "not run"
METHOD = "MaMA (this run)"
LP_FRACTIONS = (1, 10, 100)  # % of the training data (paper Tables 1-2)
TASK_TITLES = {"birads": "EMBED BI-RADS (7 classes)", "density": "EMBED density (4 classes)",
               "cancer": "Cancer (2 classes)"}
# The paper's MaMA rows (spec/reference_behaviour.md §6; EMBED at 518 px, RSNA for cancer):
# (bACC, AUC) for ZS, LP 1 %, LP 10 %, LP 100 %.
PAPER_MAMA = {
    "birads": ((31.04, 74.83), (28.46, 70.63), (35.12, 75.98), (39.75, 77.50)),
    "density": ((75.40, 93.46), (76.26, 93.11), (78.11, 93.62), (78.09, 93.65)),
    "cancer": ((60.84, 63.55), None, None, (67.50, 73.99)),
}
PAPER_MAMA_FFT = {"birads": (40.31, 77.36), "density": (78.02, 93.65), "cancer": (65.20, 73.01)}


# ----------------------------------------------------------------------------- reading

def _load_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err


def _tasks(result: dict | None) -> dict:
    """{task: entry} of a zero-shot or linear-probe result (under "tasks", or top level)."""
    if not isinstance(result, dict):
        return {}
    tasks = result.get("tasks", result)
    return {k: v for k, v in tasks.items() if k in captions.TASKS and isinstance(v, dict)}


def _block(entry) -> tuple[dict, dict]:
    """(metrics, ci) of one result entry: {"metrics": {...}, "ci": {...}} (zero-shot) or
    bare metrics holding "ci95" (linear probe)."""
    if not isinstance(entry, dict):
        return {}, {}
    metrics = entry.get("metrics", entry)
    ci = entry.get("ci") or metrics.get("ci") or metrics.get("ci95") or {}
    return (metrics if isinstance(metrics, dict) else {}), (ci if isinstance(ci, dict) else {})


def _fft_results(workdir: str) -> dict:
    """{task: entry} of the finetune job's finetune_<task>.json files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "finetune_*.json"))):
        out.update(_tasks(_load_json(path)))
    return out


def _fraction_percent(key) -> float | None:
    """A training-data share as a percentage: "1%" -> 1; fractions up to 1 ("0.01", 0.1,
    "frac_0.1", "1.0") -> 1, 10, 10, 100; larger numbers are percentages ("10" -> 10).
    None if unreadable."""
    text = str(key).strip().rstrip("%").split("_")[-1]
    try:
        value = float(text)
    except ValueError:
        return None
    return value * 100 if value <= 1 and not str(key).strip().endswith("%") else value


def _lp_fractions(task_entry: dict) -> dict:
    """{percent: per-fraction entry} of one linear-probe task."""
    fractions = task_entry.get("fractions", task_entry)
    out = {}
    for key, entry in fractions.items():
        pct = _fraction_percent(key)
        if pct is not None and isinstance(entry, dict):
            out[round(pct, 6)] = entry
    return out


def _lp_split(entry: dict, splits=("test",)) -> dict | None:
    """The metrics of the first evaluation split present in a linear-probe fraction
    (its "eval" dict: test, and test_subset where the dataset flags the paper's subset)."""
    for split in splits:
        for holder in (entry.get("eval"), entry.get("splits"), entry):
            if isinstance(holder, dict) and isinstance(holder.get(split), dict):
                return holder[split]
    return None


SUBSET_SPLITS = ("test_subset", "balanced_test")


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


read_metrics_jsonl = metrics_file.read_metrics_file


# ----------------------------------------------------------------------------- formatting

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x) -> str:
    return f"{100 * x:.2f}" if _finite(x) else "n/a"


def with_ci(value, ci) -> str:
    text = pct(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(c) for c in ci):
        text += f" [{pct(ci[0])}, {pct(ci[1])}]"
    return text


def bacc_auc(entry) -> str:
    """"bACC [CI] / AUC [CI]" of a result entry, or NOT_RUN."""
    metrics, ci = _block(entry)
    if not metrics:
        return NOT_RUN
    return (f"{with_ci(metrics.get('balanced_accuracy'), ci.get('balanced_accuracy'))} / "
            f"{with_ci(metrics.get('auc'), ci.get('auc'))}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ----------------------------------------------------------------------------- figures

def _rel(path: str, workdir: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, workdir) if path.startswith(os.path.abspath(workdir) + os.sep) else path


def _result_row(label: str, zs_entry, fractions: dict, fft_entry, splits) -> list[str]:
    """One table row: ZS, each LP fraction and FFT on the first of `splits` each has."""
    row = [label, bacc_auc(zs_entry) if zs_entry else NOT_RUN]
    for f in LP_FRACTIONS:
        entry = _lp_split(fractions[f], splits) if f in fractions else None
        row.append(bacc_auc(entry) if entry else NOT_RUN)
    entry = _lp_split(fft_entry, splits) if fft_entry else None
    return row + [bacc_auc(entry) if entry else NOT_RUN]


def _results_tables(zs: dict, lp: dict, fft: dict) -> list[str]:
    out = ["## Results", "",
           "bACC / AUC in %, 95 % bootstrap intervals in brackets. ZS = zero-shot with the "
           "class prompts; LP = linear probe on that share of the training data (L-BFGS "
           "logistic regression on extracted embeddings, not the paper's SGD probe); FFT = "
           "full fine-tune (last weights). Where the dataset flags the paper's class-stratified "
           "test subset (§4.2), the first row is on it, the protocol of the paper's tables, "
           "and the whole test split follows; otherwise the row is the whole test split. "
           "MaMA (paper): arXiv 2409.18119v2 on full EMBED (RSNA for cancer) at 518 px, a "
           "reference point that a small run is not expected to reach.", ""]
    for task in captions.TASKS:
        if task not in zs and task not in lp and task not in fft:
            continue
        fractions = _lp_fractions(lp.get(task, {}))
        fft_entry = _lp_split(fft[task]) if task in fft else None
        rows = [_result_row(METHOD, zs.get(task), fractions, fft.get(task), ("test",))]
        subset = _result_row(f"{METHOD}, test subset", (zs.get(task) or {}).get("subsets", {}).get(
            "test_subset"), fractions, fft.get(task), SUBSET_SPLITS)
        if any(cell != NOT_RUN for cell in subset[1:]):
            rows = [subset, [f"{METHOD}, whole test split"] + rows[0][1:]]
        if task in PAPER_MAMA:
            paper = PAPER_MAMA[task] + (PAPER_MAMA_FFT.get(task),)
            rows.append(["MaMA (paper)"] + [f"{c[0]:.2f} / {c[1]:.2f}" if c else "-"
                                            for c in paper])
        header = ["Method", "ZS"] + [f"LP {f}%" for f in LP_FRACTIONS] + ["FFT"]
        out += [f"### {TASK_TITLES[task]}", ""] + _table(header, rows) + [""]
        extra = sorted(set(fractions) - set(LP_FRACTIONS))
        subset = [(f, _lp_split(fractions[f], SUBSET_SPLITS)) for f in sorted(fractions)]
        if extra or any(b for _, b in subset):
            rows = [[f"{f:g}%", bacc_auc(_lp_split(fractions[f])), bacc_auc(b) if b else NOT_RUN]
                    for f, b in subset]
            out += ["Linear probe, every fraction (test subset: the paper's class-stratified "
                    "test subset where the dataset flags one):", ""] + _table(
                ["Train data", "test", "test subset"], rows) + [""]
        notes = [f"- LP {f:g}%: {w}" for f in sorted(fractions)
                 for w in fractions[f].get("warnings") or []]
        if notes:
            out += ["Linear-probe warnings:", ""] + notes + [""]
        if task == "cancer":
            out += _binary_rows(zs.get(task), fractions.get(100.0), fft_entry)
    return out


def _binary_rows(zs_entry, lp_entry, fft_entry) -> list[str]:
    rows = []
    for name, entry in (("ZS", zs_entry), ("LP 100%", _lp_split(lp_entry) if lp_entry else None),
                        ("FFT", fft_entry)):
        metrics, _ = _block(entry)
        rows.append([name] + [pct(metrics.get(k)) if metrics else NOT_RUN
                              for k in ("sensitivity", "specificity", "ppv", "npv", "f1")])
    return ["Cancer at the argmax threshold:", ""] + _table(
        ["Setting", "SEN", "SPE", "PPV", "NPV", "F1"], rows) + [""]


def _per_class(zs: dict, lp: dict) -> list[str]:
    out = []
    for task in captions.TASKS:
        settings = [("ZS", zs.get(task))]
        fractions = _lp_fractions(lp.get(task, {}))
        if 100.0 in fractions:
            settings.append(("LP 100%", _lp_split(fractions[100.0])))
        settings = [(n, _block(e)[0]) for n, e in settings if _block(e)[0]]
        if not settings:
            continue
        names = list(captions.CLASS_NAMES[task])
        rows = []
        for c, cname in enumerate(names):
            row = [f"{c}: {cname}"]
            for _, m in settings:
                recall, support = m.get("per_class_recall") or [], m.get("support") or []
                row.append(pct(recall[c]) if c < len(recall) else "n/a")
                row.append(str(support[c]) if c < len(support) else "n/a")
            rows.append(row)
        header = ["Class"] + [h for n, _ in settings for h in (f"{n} recall", f"{n} n")]
        out += [f"### Per-class recall: {TASK_TITLES[task]}", ""] + _table(header, rows) + [""]
    return out


def _figures(zs_json: dict | None, zs: dict, lp: dict, workdir: str, fig_dir: str) -> list[str]:
    out, split = [], (zs_json or {}).get("split", "test")
    aggregate = (zs_json or {}).get("aggregate", "image")
    for task in captions.TASKS:
        names = list(captions.CLASS_NAMES[task])
        sources = [("zeroshot", "zero-shot", zs.get(task))]
        fractions = _lp_fractions(lp.get(task, {}))
        for f in sorted(fractions):
            sources.append((f"lp{f:g}", f"linear probe {f:g}%", _lp_split(fractions[f])))
        for key, label, entry in sources:
            metrics, _ = _block(entry)
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
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _pct(value) -> str:
    return f"{100 * value:.0f}%" if _finite(value) else "n/a"


def _maps_section(maps_json: dict | None, workdir: str) -> list[str]:
    out = ["## Sentence-to-patch similarity maps (Fig. 3)", ""]
    if not maps_json:
        return out + [f"Similarity maps: {NOT_RUN} (no maps/maps.json).", ""]
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
        rng = f"cosine {lo:.3f}..{hi:.3f}" if _finite(lo) and _finite(hi) else ""
        roi = m.get("roi") or {}
        if _finite(roi.get("lift")):
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
        parts.append(f"{task} {pct(bacc)} / {pct(auc)} (step {step})")
    return "; ".join(parts)


def _val_zeroshot_section(rows: dict, workdir: str, fig_dir: str) -> tuple[list[str], str | None]:
    """(lines, figure) of pretraining's validation zero-shot curves, or a "not run" line."""
    path = val_zeroshot_png(rows, os.path.join(fig_dir, "val_zeroshot.png")) if rows else None
    if not path:
        return [f"Validation zero-shot during pretraining: {NOT_RUN} (no val_zs/ keys in "
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
    zs, lp, fft = _tasks(zs_json), _tasks(lp_json), _fft_results(workdir)

    lines = [f"# {cfg.get('title', '') or 'MaMA evaluation report'}", "", "## Inputs", ""]
    for name, present, what in (
            ("zeroshot.json", zs_json is not None, f"tasks {', '.join(zs) or 'none'}"),
            ("linear_probe.json", lp_json is not None, f"tasks {', '.join(lp) or 'none'}"),
            ("finetune_<task>.json", bool(fft), f"tasks {', '.join(fft)}"),
            ("maps/maps.json", maps_json is not None,
             f"{len((maps_json or {}).get('maps', []))} maps"),
            ("metrics.jsonl (pretraining)", metrics_path is not None, metrics_path or "")):
        lines.append(f"- {name}: {what if present else NOT_RUN}")
    for key, label in (("step", "zero-shot checkpoint step"), ("prefix", "zero-shot prompt prefix"),
                       ("aggregate", "zero-shot aggregation"), ("split", "zero-shot split")):
        if isinstance(zs_json, dict) and key in zs_json:
            lines.append(f"- {label}: {zs_json[key]}")
    lines.append("")

    if zs or lp or fft:
        lines += _results_tables(zs, lp, fft) + _per_class(zs, lp)
    else:
        lines += ["## Results", "", f"Zero-shot: {NOT_RUN}. Linear probe: {NOT_RUN}. "
                  f"Fine-tune: {NOT_RUN}.", ""]
    lines += _figures(zs_json, zs, lp, workdir, fig_dir)

    lines += ["## Pretraining losses and validation zero-shot", ""]
    loss_path, rows = None, {}
    if metrics_path:
        rows = read_metrics_jsonl(metrics_path)
        loss_path = loss_png(rows, os.path.join(fig_dir, "losses.png")) if rows else None
        if loss_path:
            last = rows[max(rows)]
            terms = ", ".join(f"{t} {last[t]:.4f}" for t in LOSS_TERMS if _finite(last.get(t)))
            lines += [f"![pretraining losses]({_rel(loss_path, workdir)})", "",
                      f"Step {max(rows)}: {terms}.", ""]
    if not loss_path:
        lines += [f"Loss curves: {NOT_RUN} (no metrics.jsonl with loss terms found).", ""]
    val_lines, val_path = _val_zeroshot_section(rows, workdir, fig_dir)
    lines += val_lines
    lines += _maps_section(maps_json, workdir)

    path = os.path.join(workdir, REPORT_MD)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    figures = sorted(glob.glob(os.path.join(fig_dir, "*.png")))
    return {"report": path, "zeroshot_tasks": len(zs), "linear_probe_tasks": len(lp),
            "finetune_tasks": len(fft),
            "maps": len((maps_json or {}).get("maps", [])), "loss_curves": int(loss_path is not None),
            "val_zeroshot_curves": int(val_path is not None),
            "figures": len(figures)}
