"""Pretraining: one jitted, sharded step and the loop around it.

The step takes the trainable parameters, the rest of the model state (frozen
weights, BatchNorm statistics), the optimiser state and a global batch; it
returns them updated plus the loss terms. One step is one optimizer update on
one global batch, whether it runs in one pass or in train.micro_batches
(grad_cache: the same loss and gradients); every step count counts updates. train()
feeds it from Grain through the one loop (mama_jax/train/loop.py: cadence, deferred reads,
the non-finite stop, signals) and resumes from the latest checkpoint.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mama_jax import factory, objective, run_model
from mama_jax.input import pipeline
from mama_jax.models import mama
from mama_jax.train import checkpoint, grad_cache, loop, metrics_log, optim, sharding, state

STEP_INPUTS = ("view1", "view2", "input_ids", "attention_mask")


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
        scales = dict(logit_scale=model.logit_scale[...], local_scale=model.local_scale[...])
        if options.clip_kind == "sigmoid":  # only sigmoid models have the SigLIP bias
            scales["logit_bias"] = model.logit_bias[...]
        total, parts = objective.mama_loss(
            emb, step=step, delta=delta, nt_xent_temperature=nt_xent_temperature,
            options=options, mesh=mesh, data_axes=sharding.BATCH_AXES, **scales)
        return total, dict(parts, **scales)

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


class Run(state.ShardedState):
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
    # Run.create checks this too; here it fails before the model (GBs at paper size) loads.
    grad_cache.check_micro_batches(cfg.data.global_batch_size, cfg.train.micro_batches, mesh.size)
    data_cfg = factory.data_config(cfg)
    tok = factory.tokenizer(cfg, workdir)
    model = factory.model(cfg, tok, mesh)
    run_model.write(workdir, model.cfg, tok)  # evaluation rebuilds the model from this alone
    run = Run.create(cfg, model, mesh)
    del model
    iterator = pipeline.train_iterator(data_cfg, tok, process_index=proc, process_count=n_proc)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep=cfg.train.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        run.restore(ckpt, start, iterator)
        if proc == 0:
            print(f"pretrain: resumed from step {start} ({ckpt.directory})", flush=True)
    base_key = jax.random.key(cfg.seed + 1)
    writer = metrics_log.MetricsWriter(workdir)

    def first_batch(global_batch):
        run.compile(global_batch)
        sharding.barrier("compiled")  # hosts enter the first collective together

    job = loop.Job(
        name="pretrain",
        next_batch=lambda: sharding.shard_batch(
            {k: v for k, v in next(iterator).items() if k in STEP_INPUTS}, mesh),
        step=lambda batch, step: run.step(batch, step, jax.random.fold_in(base_key, step)),
        save=lambda done: run.save(ckpt, done, iterator),
        latest_checkpoint=lambda: f"step {ckpt.latest_step()} in {ckpt.directory}",
        writer=writer, samples_per_step=cfg.data.global_batch_size, first_batch=first_batch,
        evaluate=None if evaluate is None else (lambda done: evaluate(run, done)),
        postfix=lambda values: {"w": f"{values['w']:.0f}"})
    cadence = loop.Cadence(steps=cfg.train.steps, log_every=cfg.train.log_every,
                           checkpoint_every=cfg.train.checkpoint_every,
                           eval_every=cfg.train.get("eval_every", 0))
    try:
        outcome = loop.run(job, cadence, start)
    finally:
        writer.close()
        ckpt.close()
    if outcome.eval_seconds and proc == 0:
        total = time.perf_counter() - started
        print(f"pretrain: evaluation took {outcome.eval_seconds:.1f} s of the run's {total:.1f} s "
              f"({100 * outcome.eval_seconds / total:.1f} %)", flush=True)
    return outcome.last


def per_step_losses(workdir: str) -> dict[int, float]:
    """The logged total loss per step (for tests and reports)."""
    return {s: v["total"] for s, v in metrics_log.read_metrics(workdir).items()}


