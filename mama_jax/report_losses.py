"""Print how the pretraining loss moved: `python -m mama_jax.report_losses WORKDIR`.

Means of each logged term over the first and the last `--window` steps
(the logged values are already means over each logging interval).
"""

from __future__ import annotations

import argparse

from mama_jax.train import metrics_log

TERMS = ("total", "total_wo_local", "vt_1", "vt_2", "vv", "local")


def summarize(workdir: str, window: int = 50) -> dict:
    rows = metrics_log.read_metrics(workdir)
    if not rows:
        raise ValueError(f"{workdir}/metrics.jsonl has no rows")
    steps = sorted(rows)
    first = [s for s in steps if s <= steps[0] + window - 1] or steps[:1]
    last = [s for s in steps if s > steps[-1] - window] or steps[-1:]
    for values in rows.values():  # comparable across delta, where w switches the local term on
        values["total_wo_local"] = values["total"] - values.get("w", 0.0) * values.get("local", 0.0)
    mean = lambda ss, k: sum(rows[s][k] for s in ss) / len(ss)
    return {k: (mean(first, k), mean(last, k)) for k in TERMS if k in rows[steps[0]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("workdir")
    p.add_argument("--window", type=int, default=50)
    args = p.parse_args()
    for term, (a, b) in summarize(args.workdir, args.window).items():
        print(f"{term:>14}: first {args.window} steps {a:.4f} -> last {args.window} steps {b:.4f}")


if __name__ == "__main__":
    main()
