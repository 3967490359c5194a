"""The state a training job keeps on its mesh, saved and restored through a Checkpointer.

Trainable parameters, the rest of the model (frozen weights, BatchNorm statistics) and
the optimiser state, each placed with sharding.state_shardings. A restore reads a
checkpoint straight into this mesh's layout, whatever mesh wrote it. Used by
pretraining (pretrain.Run) and fine-tuning (evaluate/finetune_model.State).
"""

from __future__ import annotations

import jax
import optax

from mama_jax.train import checkpoint, sharding


class ShardedState:
    def __init__(self, trainable, rest, tx: optax.GradientTransformation, mesh):
        self.mesh = mesh
        self.trainable_sh = sharding.state_shardings(trainable, mesh)
        self.rest_sh = sharding.state_shardings(rest, mesh)
        self.trainable = jax.device_put(trainable, self.trainable_sh)
        self.rest = jax.device_put(rest, self.rest_sh)
        opt_state = jax.jit(tx.init)(self.trainable)
        self.opt_sh = sharding.state_shardings(opt_state, mesh)
        self.opt_state = jax.device_put(opt_state, self.opt_sh)
        self._frozen_on_disk = False

    def save(self, ckpt: checkpoint.Checkpointer, step: int, data_iterator=None) -> None:
        """What changes, every save; the frozen parameters with this run's first save only
        (a resumed run restored them, so they are on disk already)."""
        ckpt.save_state(step, self.trainable, self.rest, self.opt_state, data_iterator,
                        write_frozen=not self._frozen_on_disk)
        self._frozen_on_disk = True

    def restore(self, ckpt: checkpoint.Checkpointer, step: int, data_iterator=None) -> None:
        self.trainable, self.rest, self.opt_state = ckpt.restore_state(
            step, checkpoint.abstract_like(self.trainable, self.trainable_sh),
            checkpoint.abstract_like(self.rest, self.rest_sh),
            checkpoint.abstract_like(self.opt_state, self.opt_sh), data_iterator)
        self._frozen_on_disk = True
