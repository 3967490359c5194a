"""Training metrics: JSONL and TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


def read_metrics_file(path: str) -> dict[int, dict]:
    """A metrics.jsonl as {step: values}; a resumed run's later line for a step wins."""
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row.pop("step"))] = row
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path} line {n}: not a metrics row ({err})") from err
    return rows


def read_metrics(workdir: str) -> dict[int, dict]:
    return read_metrics_file(os.path.join(workdir, "metrics.jsonl"))
