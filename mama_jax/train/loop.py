"""The one training loop: pretraining and fine-tuning each supply a step and their batches.

It owns what both jobs need: the step's scalars are read only once the next step is queued
(the device never waits for the host), a non-finite loss stops the run before any log line
or checkpoint of that step, log / checkpoint / evaluation cadence, SIGTERM and SIGINT (every
host stops and saves together), throughput and the progress bar. Resuming is the job's: it
restores its state and passes `start`.

Stopping together on several hosts uses JAX's preemption sync point: the distributed
runtime turns a SIGTERM on any host into a notice to all, and they agree in the background
on the step at which every host saves. Nothing is exchanged per step, so the loop never
waits for the other hosts between checkpoints (an all-gather of a stop flag every step
would). SIGINT is passed on as a SIGTERM to the same machinery.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

from mama_jax.train import sharding


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class StopFlag:
    """SIGTERM / SIGINT ask the loop to save and exit after a step that every host agrees on.

    One process: a Python handler sets a flag. Several: SIGTERM stays with the distributed
    runtime's preemption notifier (installed by jax.distributed.initialize), SIGINT is
    re-sent as SIGTERM, and `stop_after(done)` asks reached_preemption_sync_point. Without
    the preemption service (jax_enable_preemption_service off) the hosts all-gather the
    flag every step instead.
    """

    def __init__(self):
        self.signal = None
        self._old = {}
        self._sync = jax.process_count() > 1 and _preemption_service()

    def __enter__(self):
        for sig in (signal.SIGINT,) if self._sync else (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if self._sync:  # hand it to the runtime, which tells every host
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_after(self, done: int) -> bool:
        """Whether every host stops after `done` steps (called once per step on every host)."""
        if self._sync:
            stop = multihost_utils.reached_preemption_sync_point(done)
        else:
            stop = sharding.any_process(self.signal is not None)
        if stop and self.signal is None:
            self.signal = "SIGTERM (preemption notice)" if self._sync else "stop on another process"
        return stop

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _preemption_service() -> bool:
    from jax._src import distributed  # the runtime's state has no public handle

    return distributed.global_state.preemption_sync_manager is not None


class _Window:
    """Means of the step metrics since the last log line, plus throughput."""

    def __init__(self):
        self.sums, self.steps, self.samples, self.seconds, self.data_seconds = {}, 0, 0, 0.0, 0.0
        self.last_lr = None

    def add(self, values: dict, samples: int, seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.last_lr = values.get("lr")
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.data_seconds += data_seconds

    def flush(self) -> dict:
        out = {k: v / self.steps for k, v in self.sums.items()}
        if self.last_lr is not None:
            out["lr"] = self.last_lr  # the schedule at the window's last step, not a mean
        out.update(samples_per_s=self.samples / max(self.seconds, 1e-9),
                   data_wait_s=self.data_seconds / self.steps)
        self.__init__()
        return out


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Every count is in optimizer steps."""
    steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0


@dataclasses.dataclass
class Outcome:
    last: dict = dataclasses.field(default_factory=dict)  # the last logged values
    stopped: str | None = None  # the signal that stopped the run, if one did
    eval_seconds: float = 0.0


@dataclasses.dataclass
class Job:
    """What a job supplies. step(batch, step) returns replicated device scalars, loss_key
    among them; save(done) checkpoints after `done` steps; evaluate(done) returns scores."""
    name: str
    next_batch: Callable[[], Any]
    step: Callable[[Any, int], dict]
    save: Callable[[int], None]
    latest_checkpoint: Callable[[], Any]  # for the non-finite message
    writer: Any  # metrics_log.MetricsWriter
    samples_per_step: int
    loss_key: str = "total"
    first_batch: Callable[[Any], None] | None = None  # e.g. compile, then meet the other hosts
    at_log: Callable[[int], dict] | None = None  # host-side values for a log line (e.g. lr)
    evaluate: Callable[[int], dict] | None = None
    postfix: Callable[[dict], dict] | None = None


def run(job: Job, cadence: Cadence, start: int) -> Outcome:
    """Steps start .. cadence.steps - 1 of `job`."""
    outcome, window = Outcome(), _Window()
    proc = jax.process_index()
    clock = time.perf_counter()

    def check(done, out, data_wait_s):
        """Read a finished step's scalars (waits for that step only); stop on a bad loss."""
        nonlocal clock
        values = sharding.local_scalars(out)
        if not math.isfinite(values[job.loss_key]):
            raise NonFiniteLossError(
                f"{job.name} step {done}: loss is {values[job.loss_key]} (terms: {values}); "
                f"stopped without saving, the last good checkpoint is {job.latest_checkpoint()}")
        now = time.perf_counter()
        window.add(values, job.samples_per_step, now - clock, data_wait_s)
        clock = now
        return values

    bar = tqdm(total=cadence.steps, initial=start, desc=job.name, unit="step",
               dynamic_ncols=True, disable=proc != 0)
    pending = None  # (step number, outputs, data wait) of the step dispatched last, unread
    try:
        with StopFlag() as stop:
            for step in range(start, cadence.steps):
                t0 = time.perf_counter()
                batch = job.next_batch()
                data_wait_s = time.perf_counter() - t0
                if step == start and job.first_batch is not None:
                    job.first_batch(batch)
                out = job.step(batch, step)
                # The previous step's scalars are read only now, with this step queued: the
                # device runs one step while the host fetches and copies the next batch.
                if pending is not None:
                    check(*pending)
                done = step + 1
                pending = (done, out, data_wait_s)
                bar.update()
                keep = done % cadence.checkpoint_every == 0 or done == cadence.steps
                stopping = stop.stop_after(done)
                # Not when stopping: a SIGTERM's grace period is for the checkpoint.
                evaluating = (job.evaluate is not None and cadence.eval_every > 0
                              and done % cadence.eval_every == 0 and not stopping)
                log = done % cadence.log_every == 0 or done == cadence.steps or evaluating
                if log or keep or stopping:
                    values = check(*pending)  # a bad step never reaches a log line or checkpoint
                    pending = None
                scores = _evaluate(job, done, bar) if evaluating else {}
                if scores:
                    outcome.eval_seconds += scores["eval_s"]
                    clock = time.perf_counter()  # samples_per_s counts training time only
                if log:
                    extras = job.at_log(done) if job.at_log else {}
                    outcome.last = {**window.flush(), **extras, **scores}
                    job.writer.write(done, outcome.last)
                    shown = job.postfix(values) if job.postfix else {}
                    bar.set_postfix(loss=f"{outcome.last[job.loss_key]:.4f}", **shown)
                if keep or stopping:
                    job.save(done)
                if stopping:
                    outcome.stopped = stop.signal
                    bar.write(f"{outcome.stopped}: saved step {done}, exiting")
                    break
    finally:
        bar.close()
    return outcome


def _evaluate(job: Job, done: int, bar) -> dict:
    """Every process computes; only process 0 prints (and writes, through the writer)."""
    t0 = time.perf_counter()
    scores = dict(job.evaluate(done) or {})
    scores["eval_s"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        bar.write(f"step {done} eval ({scores['eval_s']:.1f} s): " + ", ".join(
            f"{k} {v:.4f}" for k, v in scores.items() if k != "eval_s"))
    return scores
