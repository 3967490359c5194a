"""The results tables of the report: Tables 1-3 of the paper laid out for one run.

Reads the result entries of the zero-shot, linear-probe and fine-tune jobs (dicts, as
their JSON files hold them) and formats bACC / AUC in %, with 95 % bootstrap intervals.
"""

from __future__ import annotations

import math

from mama_jax.input import captions

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


# ----------------------------------------------------------------------------- entries

def tasks(result: dict | None) -> dict:
    """{task: entry} of a zero-shot or linear-probe result (under "tasks", or top level)."""
    if not isinstance(result, dict):
        return {}
    entries = result.get("tasks", result)
    return {k: v for k, v in entries.items() if k in captions.TASKS and isinstance(v, dict)}


def block(entry) -> tuple[dict, dict]:
    """(metrics, ci) of one result entry: {"metrics": {...}, "ci": {...}} (zero-shot) or
    bare metrics holding "ci95" (linear probe)."""
    if not isinstance(entry, dict):
        return {}, {}
    metrics = entry.get("metrics", entry)
    ci = entry.get("ci") or metrics.get("ci") or metrics.get("ci95") or {}
    return (metrics if isinstance(metrics, dict) else {}), (ci if isinstance(ci, dict) else {})


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


def lp_fractions(task_entry: dict) -> dict:
    """{percent: per-fraction entry} of one linear-probe task."""
    fractions = task_entry.get("fractions", task_entry)
    out = {}
    for key, entry in fractions.items():
        pct = _fraction_percent(key)
        if pct is not None and isinstance(entry, dict):
            out[round(pct, 6)] = entry
    return out


def lp_split(entry: dict, splits=("test",)) -> dict | None:
    """The metrics of the first evaluation split present in a linear-probe fraction
    (its "eval" dict: test, and test_subset where the dataset flags the paper's subset)."""
    for split in splits:
        for holder in (entry.get("eval"), entry.get("splits"), entry):
            if isinstance(holder, dict) and isinstance(holder.get(split), dict):
                return holder[split]
    return None


SUBSET_SPLITS = ("test_subset", "balanced_test")


# ----------------------------------------------------------------------------- formatting

def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x) -> str:
    return f"{100 * x:.2f}" if finite(x) else "n/a"


def with_ci(value, ci) -> str:
    text = pct(value)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(c) for c in ci):
        text += f" [{pct(ci[0])}, {pct(ci[1])}]"
    return text


def bacc_auc(entry) -> str:
    """"bACC [CI] / AUC [CI]" of a result entry, or NOT_RUN."""
    metrics, ci = block(entry)
    if not metrics:
        return NOT_RUN
    return (f"{with_ci(metrics.get('balanced_accuracy'), ci.get('balanced_accuracy'))} / "
            f"{with_ci(metrics.get('auc'), ci.get('auc'))}")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ----------------------------------------------------------------------------- tables

def _result_row(label: str, zs_entry, fractions: dict, fft_entry, splits) -> list[str]:
    """One table row: ZS, each LP fraction and FFT on the first of `splits` each has."""
    row = [label, bacc_auc(zs_entry) if zs_entry else NOT_RUN]
    for f in LP_FRACTIONS:
        entry = lp_split(fractions[f], splits) if f in fractions else None
        row.append(bacc_auc(entry) if entry else NOT_RUN)
    entry = lp_split(fft_entry, splits) if fft_entry else None
    return row + [bacc_auc(entry) if entry else NOT_RUN]


def _sgd_rows(fractions: dict) -> list[list[str]]:
    """The SGD probe's rows (LP columns only): on the test subset first where flagged."""
    def row(label, splits):
        cells = []
        for f in LP_FRACTIONS:
            entry = lp_split(fractions[f], splits) if f in fractions else None
            cells.append(bacc_auc(entry) if entry else NOT_RUN)
        return [label, "-"] + cells + ["-"]

    label = f"{METHOD}, SGD probe"
    whole, subset = row(label, ("test",)), row(f"{label}, test subset", SUBSET_SPLITS)
    if any(cell != NOT_RUN for cell in subset[2:-1]):
        return [subset, [f"{label}, whole test split"] + whole[1:]]
    return [whole]


def results_tables(zs: dict, lp: dict, fft: dict, sgd: dict | None = None) -> list[str]:
    """sgd: {task: {percent: entry}} of the SGD linear probe (finetune job, protocol linear)."""
    sgd = sgd or {}
    out = ["## Results", "",
           "bACC / AUC in %, 95 % bootstrap intervals in brackets. ZS = zero-shot with the "
           "class prompts; LP = linear probe on that share of the training patients: in the "
           "MaMA (this run) rows an L-BFGS logistic regression on extracted embeddings "
           "(configs/linear_probe.py), in the SGD probe rows the paper's protocol (frozen tower, "
           "SGD with momentum, class-balanced draws, augmentation; configs/finetune.py:probe); "
           "FFT = full fine-tune (last weights). Where the dataset flags the paper's class-stratified "
           "test subset (§4.2), the first row is on it, the protocol of the paper's tables, "
           "and the whole test split follows; otherwise the row is the whole test split. "
           "MaMA (paper): arXiv 2409.18119v2 on full EMBED (RSNA for cancer) at 518 px, a "
           "reference point that a small run is not expected to reach.", ""]
    for task in captions.TASKS:
        if task not in zs and task not in lp and task not in fft and task not in sgd:
            continue
        fractions = lp_fractions(lp.get(task, {}))
        fft_entry = lp_split(fft[task]) if task in fft else None
        rows = [_result_row(METHOD, zs.get(task), fractions, fft.get(task), ("test",))]
        subset = _result_row(f"{METHOD}, test subset", (zs.get(task) or {}).get("subsets", {}).get(
            "test_subset"), fractions, fft.get(task), SUBSET_SPLITS)
        if any(cell != NOT_RUN for cell in subset[1:]):
            rows = [subset, [f"{METHOD}, whole test split"] + rows[0][1:]]
        if task in sgd:
            rows += _sgd_rows(sgd[task])
        if task in PAPER_MAMA:
            paper = PAPER_MAMA[task] + (PAPER_MAMA_FFT.get(task),)
            rows.append(["MaMA (paper)"] + [f"{c[0]:.2f} / {c[1]:.2f}" if c else "-"
                                            for c in paper])
        header = ["Method", "ZS"] + [f"LP {f}%" for f in LP_FRACTIONS] + ["FFT"]
        out += [f"### {TASK_TITLES[task]}", ""] + table(header, rows) + [""]
        extra = sorted(set(fractions) - set(LP_FRACTIONS))
        subset = [(f, lp_split(fractions[f], SUBSET_SPLITS)) for f in sorted(fractions)]
        if extra or any(b for _, b in subset):
            rows = [[f"{f:g}%", bacc_auc(lp_split(fractions[f])), bacc_auc(b) if b else NOT_RUN]
                    for f, b in subset]
            out += ["Linear probe, every fraction (test subset: the paper's class-stratified "
                    "test subset where the dataset flags one):", ""] + table(
                ["Train data", "test", "test subset"], rows) + [""]
        notes = [f"- LP {f:g}%: {w}" for f in sorted(fractions)
                 for w in fractions[f].get("warnings") or []]
        notes += [f"- SGD probe {f:g}%: {w}" for f, e in sorted(sgd.get(task, {}).items())
                  for w in e.get("warnings") or []]
        if notes:
            out += ["Linear-probe warnings:", ""] + notes + [""]
        if task == "cancer":
            out += _binary_rows(zs.get(task), fractions.get(100.0), fft_entry)
    return out


def _binary_rows(zs_entry, lp_entry, fft_entry) -> list[str]:
    rows = []
    for name, entry in (("ZS", zs_entry), ("LP 100%", lp_split(lp_entry) if lp_entry else None),
                        ("FFT", fft_entry)):
        metrics, _ = block(entry)
        rows.append([name] + [pct(metrics.get(k)) if metrics else NOT_RUN
                              for k in ("sensitivity", "specificity", "ppv", "npv", "f1")])
    return ["Cancer at the argmax threshold:", ""] + table(
        ["Setting", "SEN", "SPE", "PPV", "NPV", "F1"], rows) + [""]


def per_class(zs: dict, lp: dict) -> list[str]:
    out = []
    for task in captions.TASKS:
        settings = [("ZS", zs.get(task))]
        fractions = lp_fractions(lp.get(task, {}))
        if 100.0 in fractions:
            settings.append(("LP 100%", lp_split(fractions[100.0])))
        settings = [(n, block(e)[0]) for n, e in settings if block(e)[0]]
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
        out += [f"### Per-class recall: {TASK_TITLES[task]}", ""] + table(header, rows) + [""]
    return out
