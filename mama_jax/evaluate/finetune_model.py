"""The fine-tune model (vision tower + linear head on g(x)), its optimiser, sharded
train state and step, and the restore of a finished fine-tune run."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mama_jax import factory
from mama_jax.evaluate import restore
from mama_jax.models import mama
from mama_jax.models.vit import VisionTransformer
from mama_jax.train import optim, sharding, state

RUN_FILE = "run.json"  # in WORKDIR/finetune/<task>/: what the run was started from


class Classifier(nnx.Module):
    """The vision tower and a linear head on g(x)."""

    def __init__(self, vision: VisionTransformer, num_classes: int, *, rngs: nnx.Rngs):
        self.vision = vision
        # PyTorch nn.Linear's default init, as the official head: U(+-1/sqrt(fan_in)).
        self.head = nnx.Linear(vision.cfg.hidden, num_classes, dtype=jnp.float32,
                               param_dtype=jnp.float32,
                               kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                               rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """g(x) [B, Dv] fp32, as MaMA.image_features (the final norm is never run)."""
        return self.vision.encode(self.vision.embed(images)).astype(jnp.float32).mean(axis=1)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


PROTOCOLS = ("fft", "linear")  # full fine-tune | the paper's SGD linear probe (tower frozen)


def trainable_filter(protocol: str = "fft"):
    """fft: everything but the ViT's final norm (g does not use it) and mask token (spec
    §4.2). linear: the head only; the tower's gradient is never computed."""
    if protocol == "linear":
        return nnx.All(nnx.Param, nnx.PathContains("head"))
    if protocol != "fft":
        raise ValueError(f"config.protocol: unknown {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return nnx.All(nnx.Param, *[nnx.Not(nnx.All(nnx.PathContains("vision"), nnx.PathContains(n)))
                                for n in mama.FROZEN_VISION])


def lr_schedule(o, steps: int) -> optax.Schedule:
    """Linear warm-up init_lr -> lr, cosine to end_lr at total_steps (0 = steps)."""
    return optim.schedule(o.lr, o.warmup_steps, o.total_steps or steps, o.init_lr, o.end_lr)


def make_optimizer(o, steps: int) -> optax.GradientTransformation:
    """torch.optim.SGD(momentum, weight_decay): decay joins the gradient before momentum,
    on every parameter (as the official run)."""
    return optax.chain(optax.add_decayed_weights(o.weight_decay),
                       optax.sgd(lr_schedule(o, steps), momentum=o.momentum))


def train_step(graphdef, trainable, rest, opt_state, images, labels, *, tx,
               frozen_tower: bool = False):
    if frozen_tower:  # the probe: g(x) once, outside the gradient; only the head is traced
        feats = jax.lax.stop_gradient(nnx.merge(graphdef, trainable, rest).features(images))
        forward = lambda net: net.head(feats)  # noqa: E731
    else:
        forward = lambda net: net(images)  # noqa: E731

    def loss_fn(trainable):
        logits = forward(nnx.merge(graphdef, trainable, rest))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    out = {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean(),
           "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(trainable, updates), opt_state, out


def data_parallel_mesh(batch_size: int):
    """The most devices that divide the batch; every device on multi-host runs."""
    devices = jax.devices()
    n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    if jax.process_count() > 1 and n != len(devices):
        raise factory.ConfigError(f"config.batch_size={batch_size} must divide evenly over all "
                                  f"{len(devices)} devices of a multi-host run")
    return sharding.make_mesh(n, 1, devices=devices[:n])


class State(state.ShardedState):
    """The classifier's sharded parameters and optimiser state, and its jitted step."""

    def __init__(self, net: Classifier, tx: optax.GradientTransformation, mesh,
                 protocol: str = "fft"):
        self.graphdef, trainable, rest = nnx.split(net, trainable_filter(protocol), ...)
        super().__init__(trainable, rest, tx, mesh)
        self._step = jax.jit(functools.partial(train_step, self.graphdef, tx=tx,
                                               frozen_tower=protocol == "linear"),
                             donate_argnums=(0, 2),
                             out_shardings=(self.trainable_sh, self.opt_sh,
                                            sharding.replicated(mesh)))

    def step(self, images, labels) -> dict:
        self.trainable, self.opt_state, out = self._step(self.trainable, self.rest,
                                                         self.opt_state, images, labels)
        return out


def run_name(task: str, protocol: str = "fft", fraction: float = 1.0) -> str:
    """finetune_<task> (FFT) or sgd_probe_<task>_<pct>pct: the run's folder and result file."""
    if protocol == "fft":
        return f"finetune_{task}"
    return f"sgd_probe_{task}_{100 * fraction:g}pct"


def run_dir(workdir: str, task: str, protocol: str = "fft", fraction: float = 1.0) -> str:
    """WORKDIR/finetune/<task> (FFT) or WORKDIR/sgd_probe/<task>_<pct>pct."""
    if protocol == "fft":
        return os.path.join(os.path.abspath(workdir), "finetune", task)
    return os.path.join(os.path.abspath(workdir), "sgd_probe", f"{task}_{100 * fraction:g}pct")


def restore_classifier(workdir: str, task: str, *, protocol: str = "fft", fraction: float = 1.0,
                       step: int | None = None):
    """(Classifier, step) of a fine-tune or SGD-probe run in `workdir` (latest checkpoint
    by default), on one device, for inspection, maps or export."""
    folder = run_dir(workdir, task, protocol, fraction)
    path = os.path.join(folder, RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: no {RUN_FILE}; not a fine-tune run of task {task!r}")
    with open(path) as f:
        info = json.load(f)
    # The fine-tune checkpoint holds the whole classifier, ViT included: the pretraining
    # checkpoint is not read, the tower only gives the shapes to restore into.
    vit_cfg = restore.vision_config(info["pretrain_workdir"], dtype=info["dtype"])
    net = Classifier(restore.abstract_vision(vit_cfg), info["num_classes"], rngs=nnx.Rngs(0))
    return restore.restore_split(net, trainable_filter(info.get("protocol", "fft")),
                                 os.path.join(folder, "checkpoints"), step)
