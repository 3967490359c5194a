"""Device mesh, parameter and batch shardings.

One mesh with two axes: `data` (pure data parallel) and `fsdp` (data parallel
whose parameters are also split). The batch is split over both; a parameter
is split over `fsdp` along its largest dimension that divides evenly, once it
is big enough to be worth it (big_vision's fsdp rule). The same code runs on
1 CPU, 8 forced CPU devices, a GPU node or many hosts.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0").split("(")[0])  # SLURM may write "4(x2)"
    except ValueError:
        return 0


def multiprocess_environment() -> str:
    """The multi-process launcher this process runs under, or "" for a single process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if _env_int("SLURM_NTASKS") > 1 or _env_int("SLURM_STEP_NUM_TASKS") > 1:
        return "SLURM"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod slice"
    return ""


def initialize_distributed(cfg) -> bool:
    """Start jax.distributed for a multi-process run; call before any other JAX call.

    cfg is config.distributed (see configs/pretrain.py). With enabled="auto" a
    run initialises when an explicit coordinator or process count is given or
    the environment is a multi-process launcher (SLURM, Open MPI, TPU pod,
    JAX_COORDINATOR_ADDRESS); every field left at its default is then detected
    by JAX from that environment. Returns whether it initialised.
    """
    if cfg is None or cfg.enabled == "off":
        return False
    if cfg.enabled not in ("auto", "on"):
        raise ValueError(f"config.distributed.enabled={cfg.enabled!r}; use auto, on or off")
    explicit = bool(cfg.coordinator_address) or cfg.num_processes > 1
    if cfg.enabled == "auto" and not explicit and not multiprocess_environment():
        return False
    if jax.distributed.is_initialized():
        return True
    local_ids = [int(i) for i in str(cfg.local_device_ids).split(",") if i.strip()]
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes if cfg.num_processes > 0 else None,
        process_id=cfg.process_id if cfg.process_id >= 0 else None,
        local_device_ids=local_ids or None,
        initialization_timeout=int(cfg.initialization_timeout),
        heartbeat_timeout_seconds=int(cfg.heartbeat_timeout))
    return True


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 takes what the other axis leaves."""
    # Process-major order: each host's devices form one contiguous block of the
    # flattened mesh, which is the block of the global batch it loads.
    devices = sorted(devices if devices is not None else jax.devices(),
                     key=lambda d: (d.process_index, d.id))
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


def local_scalars(tree: dict) -> dict:
    """Replicated scalar outputs as Python floats, read from this process's own copy."""
    return {k: float(np.asarray(v.addressable_data(0))) for k, v in tree.items()}


def any_process(flag: bool) -> bool:
    """True on every process when the flag is set on any one (e.g. SIGTERM on one host)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


_barriers: dict[str, int] = {}


def barrier(name: str, timeout_s: int = 900) -> None:
    """Every process waits here; a no-op for one process.

    Uses the distributed runtime's key-value barrier, not a device collective:
    gloo (CPU) gives up on a collective whose peers are 30 s late, so processes
    meet here after compiling, which can take longer on a loaded host.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the runtime client has no public handle

    _barriers[name] = _barriers.get(name, 0) + 1
    distributed.global_state.client.wait_at_barrier(f"{name}/{_barriers[name]}",
                                                    int(timeout_s * 1000))
