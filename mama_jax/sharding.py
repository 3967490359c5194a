"""Device mesh, parameter and batch shardings.

One mesh with two axes: `data` (pure data parallel) and `fsdp` (data parallel
whose parameters are also split). The batch is split over both; a parameter
is split over `fsdp` along its largest dimension that divides evenly, once it
is big enough to be worth it (big_vision's fsdp rule). The same code runs on
1 CPU, 8 forced CPU devices, a GPU node or many hosts.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 takes what the other axis leaves."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data / fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data ({data}) x fsdp ({fsdp}) must equal the {n} devices")
    grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**18) -> P:
    """Split the largest evenly divisible dimension over `fsdp` for big arrays."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(state, mesh: Mesh, min_size: int = 2**18):
    """A NamedSharding for every array leaf of `state` (params, optimiser state...)."""
    fsdp_size = mesh.shape["fsdp"]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size, min_size))

    return jax.tree.map(one, state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays split over the mesh's batch axes.

    Each process passes its own slice; jax assembles the global batch.
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return {k: one(v) for k, v in batch.items()}
