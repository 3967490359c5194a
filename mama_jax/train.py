"""Pretraining: one jitted, sharded step and the loop around it.

The step takes the trainable parameters, the rest of the model state (frozen
weights, BatchNorm statistics), the optimiser state and a global batch; it
returns them updated plus the loss terms. One step is one optimizer update on
one global batch, whether it runs in one pass or in train.micro_batches
(grad_cache: the same loss and gradients); every step count counts updates. The loop feeds it from Grain, logs,
checkpoints every N steps, on SIGTERM/SIGINT and at the end, resumes from the
latest checkpoint, and stops on a non-finite loss without saving it.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from mama_jax import (checkpoint, data, factory, grad_cache, losses, metrics, optim, run_model,
                      sharding, train_state)
from mama_jax.models import mama

STEP_INPUTS = ("view1", "view2", "input_ids", "attention_mask")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def late_start_groups(cfg) -> list[tuple[tuple[str, ...], int]]:
    """Parameter groups that train only from a later step, each with a fresh Adam then:
    the local heads and local temperature from delta (D8) and, under the official
    schedule (D1, loss.aux_start_step), the SimCLR head, which only L_VV trains."""
    groups = [(mama.LOCAL_GROUP, cfg.loss.delta)]
    if cfg.loss.use_vv and cfg.loss.aux_start_step > 0:
        groups.append((mama.SIMCLR_GROUP, cfg.loss.aux_start_step))
    return groups


def loss_and_grads(graphdef, trainable, rest, batch, step, dropout_key, *, delta,
                   nt_xent_temperature, options, mesh, micro_batches=1):
    """Eq. 4 on the global batch and the gradients of the trainable parameters, in one
    pass or in `micro_batches` (grad_cache; the same numbers either way)."""

    def loss_fn(model, emb):
        total, parts = losses.mama_loss(
            emb, step=step, delta=delta, logit_scale=model.logit_scale[...],
            local_scale=model.local_scale[...], nt_xent_temperature=nt_xent_temperature,
            options=options, mesh=mesh, data_axes=sharding.BATCH_AXES)
        return total, dict(parts, logit_scale=model.logit_scale[...],
                           local_scale=model.local_scale[...])

    return grad_cache.loss_and_grads(graphdef, trainable, rest, batch, dropout_key,
                                     loss_fn=loss_fn, micro_batches=micro_batches, mesh=mesh)


def train_step(graphdef, trainable, rest, opt_state, batch, step, dropout_key, *, tx, lr,
               **loss_settings):
    """One optimizer update: step counts updates (0 = the first)."""
    _, parts, grads, rest = loss_and_grads(graphdef, trainable, rest, batch, step, dropout_key,
                                           **loss_settings)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    out = dict(parts, grad_norm=optax.tree.norm(grads), lr=lr(step))
    return trainable, rest, opt_state, out


class Run(train_state.ShardedState):
    """The sharded training state (graphdef + three pytrees) and its jitted step."""

    @classmethod
    def create(cls, cfg, model, mesh) -> "Run":
        grad_cache.check_micro_batches(cfg.data.global_batch_size, cfg.train.micro_batches,
                                       mesh.size)
        graphdef, trainable, rest = nnx.split(model, mama.trainable_filter(model.cfg), ...)
        tx = optim.make_optimizer(cfg.optim, trainable, late_groups=late_start_groups(cfg))
        run = cls(trainable, rest, tx, mesh)
        run.graphdef = graphdef
        run.loss_settings = dict(delta=cfg.loss.delta,
                                 nt_xent_temperature=cfg.loss.nt_xent_temperature,
                                 options=factory.loss_options(cfg), mesh=mesh,
                                 micro_batches=cfg.train.micro_batches)
        lr = optim.schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps,
                            cfg.optim.init_lr, cfg.optim.end_lr)
        run._step_fn = jax.jit(
            functools.partial(train_step, graphdef, tx=tx, lr=lr, **run.loss_settings),
            donate_argnums=(0, 1, 2),
            out_shardings=(run.trainable_sh, run.rest_sh, run.opt_sh, sharding.replicated(mesh)))
        return run

    def model(self):
        return nnx.merge(self.graphdef, self.trainable, self.rest)

    def loss_and_grads(self, global_batch: dict, step: int, dropout_key, **overrides):
        """(total, parts, grads) of a step without applying it (tests, benchmarks)."""
        settings = dict(self.loss_settings, **overrides)
        fn = jax.jit(functools.partial(loss_and_grads, self.graphdef, **settings))
        total, parts, grads, _ = fn(self.trainable, self.rest, global_batch,
                                    jnp.asarray(step, jnp.int32), dropout_key)
        return total, parts, grads

    def compile(self, global_batch: dict) -> None:
        """Compile the step ahead of the first call (its cost shows up here, not in step 1)."""
        self._step_fn = self._step_fn.lower(
            self.trainable, self.rest, self.opt_state, global_batch, jnp.asarray(0, jnp.int32),
            jax.random.key(0)).compile()

    def step(self, global_batch: dict, step: int, dropout_key) -> dict:
        """One optimizer update on the global batch; `step` counts updates from 0."""
        self.trainable, self.rest, self.opt_state, out = self._step_fn(
            self.trainable, self.rest, self.opt_state, global_batch,
            jnp.asarray(step, jnp.int32), dropout_key)
        return out


class _Window:
    """Means of the step metrics since the last log line, plus throughput."""

    def __init__(self):
        self.sums, self.steps, self.samples, self.seconds, self.data_seconds = {}, 0, 0, 0.0, 0.0

    def add(self, values: dict, samples: int, seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.last_lr = values.get("lr")
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.data_seconds += data_seconds

    def flush(self, **extra) -> dict:
        out = {k: v / self.steps for k, v in self.sums.items()}
        out["lr"] = self.last_lr  # the schedule at the window's last step, not a mean
        out.update(extra, samples_per_s=self.samples / max(self.seconds, 1e-9),
                   data_wait_s=self.data_seconds / self.steps)
        self.__init__()
        return out


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves and exits after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg, workdir: str, *, evaluate=None) -> dict:
    """Run (or resume) pretraining in workdir; returns the last logged metrics.

    evaluate: optional callable (run, step) -> {name: scalar}, called on every process
    every train.eval_every steps with the live state (mama_jax/evaluate/during_training.py
    passes validation zero-shot); its values join that step's log line with its cost in
    seconds (eval_s). This module knows nothing of what it measures.
    """
    started = time.perf_counter()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    n_proc, proc = jax.process_count(), jax.process_index()
    if cfg.data.global_batch_size % mesh.size:
        raise factory.ConfigError(f"config.data.global_batch_size={cfg.data.global_batch_size} "
                                  f"must divide evenly over the {mesh.size} devices")
    data_cfg = factory.data_config(cfg)
    tok = factory.tokenizer(cfg, workdir)
    model = factory.model(cfg, tok, mesh)
    run_model.write(workdir, model.cfg, tok)  # evaluation rebuilds the model from this alone
    run = Run.create(cfg, model, mesh)
    del model
    iterator = data.train_iterator(data_cfg, tok, process_index=proc, process_count=n_proc)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep=cfg.train.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        run.restore(ckpt, start, iterator)
        if proc == 0:
            print(f"pretrain: resumed from step {start} ({ckpt.directory})", flush=True)
    base_key = jax.random.key(cfg.seed + 1)
    writer = metrics.MetricsWriter(workdir)
    steps, log_every = cfg.train.steps, cfg.train.log_every
    eval_every = cfg.train.get("eval_every", 0) if evaluate is not None else 0
    eval_seconds = 0.0
    last: dict = {}
    window = _Window()

    def save(step):
        run.save(ckpt, step, iterator)

    def check(done, out, data_wait_s):
        """Read a finished step's scalars (waits for that step only) and stop on a bad loss."""
        nonlocal clock
        values = sharding.local_scalars(out)
        if not math.isfinite(values["total"]):
            raise NonFiniteLossError(
                f"step {done}: loss is {values['total']} (terms: {values}); stopped without "
                f"saving, the last good checkpoint in {ckpt.directory} is step {ckpt.latest_step()}")
        now = time.perf_counter()
        window.add(values, cfg.data.global_batch_size, now - clock, data_wait_s)
        clock = now
        return values

    bar = tqdm(total=steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=proc != 0)
    clock = time.perf_counter()
    pending = None  # (step number, outputs, data wait) of the step dispatched last, unread
    try:
        with StopFlag() as stop:
            for step in range(start, steps):
                t0 = time.perf_counter()
                batch = next(iterator)
                data_wait_s = time.perf_counter() - t0
                global_batch = sharding.shard_batch({k: batch[k] for k in STEP_INPUTS}, mesh)
                if step == start:
                    run.compile(global_batch)
                    sharding.barrier("compiled")  # hosts enter the first collective together
                out = run.step(global_batch, step, jax.random.fold_in(base_key, step))
                # The previous step's scalars are read only now, with this step already
                # queued: the device runs one step while the host fetches and copies the
                # next batch, instead of waiting for the host after every step.
                if pending is not None:
                    check(*pending)
                done = step + 1
                pending = (done, out, data_wait_s)
                bar.update()
                keep = done % cfg.train.checkpoint_every == 0 or done == steps
                stopping = sharding.any_process(stop.signal is not None)
                # Not when stopping: a SIGTERM's grace period is for the checkpoint.
                evaluating = bool(eval_every) and done % eval_every == 0 and not stopping
                # An evaluated step gets a log line too: its scores sit beside the losses.
                log = done % log_every == 0 or done == steps or evaluating
                if log or keep or stopping:
                    values = check(*pending)  # a bad step never reaches a log line or checkpoint
                    pending = None
                scores = {}
                if evaluating:  # every process computes; the writer writes on process 0 only
                    t_eval = time.perf_counter()
                    scores = dict(evaluate(run, done) or {})
                    scores["eval_s"] = time.perf_counter() - t_eval
                    eval_seconds += scores["eval_s"]
                    clock = time.perf_counter()  # samples_per_s counts training time only
                    if proc == 0:
                        bar.write(f"step {done} eval ({scores['eval_s']:.1f} s): " + ", ".join(
                            f"{k} {v:.4f}" for k, v in scores.items() if k != "eval_s"))
                if log:
                    last = {**window.flush(), **scores}
                    writer.write(done, last)
                    bar.set_postfix(loss=f"{last['total']:.4f}", w=f"{values['w']:.0f}")
                if keep:
                    save(done)
                if stopping:
                    if done % cfg.train.checkpoint_every and done != steps:
                        save(done)
                    bar.write(f"{stop.signal or 'stop on another process'}: saved step {done}, exiting")
                    break
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if eval_seconds and proc == 0:
        total = time.perf_counter() - started
        print(f"pretrain: evaluation took {eval_seconds:.1f} s of the run's {total:.1f} s "
              f"({100 * eval_seconds / total:.1f} %)", flush=True)
    return last


def per_step_losses(workdir: str) -> dict[int, float]:
    """The logged total loss per step (for tests and reports)."""
    return {s: v["total"] for s, v in metrics.read_metrics(workdir).items()}


