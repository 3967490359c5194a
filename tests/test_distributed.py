"""Scale-out: 2 processes x 4 CPU devices == 1 process x 8, checkpoints across
topologies, and a dead process stops its peer (issue: multi-process scale-out)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from mama_jax import factory
from mama_jax.train import checkpoint, optim, pretrain, sharding
from mama_jax.input import pipeline
from tests import tolerances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10


def _config(dataset_dir, steps=3):
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = dataset_dir
    cfg.train.steps = steps
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_pair(workdir, dataset_dir, steps, logs):
    """Two training processes with 4 CPU devices each, meeting at a localhost coordinator."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "mama_jax.main", "--config=configs/demo.py:test",
               f"--workdir={workdir}", f"--config.data.dataset_dir={dataset_dir}",
               f"--config.train.steps={steps}", "--config.train.keep_checkpoints=100",
               "--config.mesh.fsdp=2",  # parameters split across the two processes too
               f"--config.distributed.coordinator_address=localhost:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
               f"--config.distributed.heartbeat_timeout={HEARTBEAT_S}"]
        log = open(os.path.join(logs, f"process_{i}.log"), "a")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def _log(logs, i):
    with open(os.path.join(logs, f"process_{i}.log")) as f:
        return f.read()


def _restore_run(cfg, workdir, step, mesh):
    """A Run on `mesh` restored from workdir's checkpoint `step`, with its data iterator."""
    tok = factory.tokenizer(cfg, workdir)
    run = pretrain.Run.create(cfg, factory.model(cfg, tok), mesh)
    iterator = pipeline.train_iterator(factory.data_config(cfg), tok)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    run.restore(ckpt, step, iterator)
    ckpt.close()
    return run, iterator


def _flat(run):
    return tolerances.flat(nnx.state(run.model()))


@pytest.mark.multiprocess
def test_two_processes_match_one_and_a_dead_peer_stops_the_other(tiny_dataset, pretrained_workdir,
                                                                 tmp_path):
    workdir, logs = str(tmp_path / "run"), str(tmp_path)
    ckpt3 = os.path.join(workdir, "checkpoints", "3", "commit_success.txt")
    procs = _launch_pair(workdir, tiny_dataset, steps=1000, logs=logs)
    deadline = time.time() + 600
    while not os.path.exists(ckpt3) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), _log(logs, 0)[-3000:] + _log(logs, 1)[-3000:]
        time.sleep(0.1)
    assert os.path.exists(ckpt3), "no step-3 checkpoint from the 2-process run"

    # A hard kill of one process: the other stops with JAX's error within the heartbeat bound.
    procs[1].kill()
    killed_at = time.time()
    procs[1].wait()
    rc = procs[0].wait(timeout=6 * HEARTBEAT_S)
    waited = time.time() - killed_at
    assert rc != 0
    assert "another task died" in _log(logs, 0), _log(logs, 0)[-3000:]
    print(f"survivor exited {waited:.1f} s after its peer was killed (rc {rc})")

    # Steps 1-3: same losses as the 1-process, 8-device run of the same config.
    one = pretrain.per_step_losses(pretrained_workdir)
    two = pretrain.per_step_losses(workdir)
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-5), step

    # ... and the same parameters after step 3, read back onto one process's 8 devices,
    # where the 2-process input position maps onto the same global position.
    cfg = _config(tiny_dataset)
    mesh = sharding.make_mesh(-1, 1)
    run_two, it_two = _restore_run(cfg, workdir, 3, mesh)
    run_one, it_one = _restore_run(cfg, pretrained_workdir, 3, mesh)
    # Parameters: Adam turns rounding-level gradient differences into update-sized ones
    # where a gradient is near zero, so elements are judged against what 3 updates can move;
    # the losses above and the next step's below are the tight checks.
    a, b = _flat(run_two), _flat(run_one)
    assert a.keys() == b.keys()
    lr = optim.schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps,
                        cfg.optim.init_lr, cfg.optim.end_lr)
    tolerances.assert_within_adam_reach(a, b, [float(lr(t)) for t in range(3)],
                                        cfg.optim.weight_decay)
    # Both states compute the same function: the next step's loss agrees.
    batch_two, batch_one = next(it_two), next(it_one)
    np.testing.assert_array_equal(batch_two["index"], batch_one["index"])
    key = jax.random.key(3)
    loss_two, loss_one = (float(run.step(sharding.shard_batch(
        {k: batch[k] for k in pretrain.STEP_INPUTS}, mesh), 3, key)["total"])
        for run, batch in ((run_two, batch_two), (run_one, batch_one)))
    assert loss_two == pytest.approx(loss_one, rel=1e-5)

    # Restarting both resumes from the last checkpoint and carries on; a SIGTERM to one
    # host then stops both after the same step (JAX's preemption sync point), both saved.
    latest = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    procs = _launch_pair(workdir, tiny_dataset, steps=1000, logs=logs)
    deadline = time.time() + 600
    while max(pretrain.per_step_losses(workdir), default=0) < latest + 2 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), _log(logs, 0)[-3000:] + _log(logs, 1)[-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
        assert p.wait(timeout=300) == 0, _log(logs, 0)[-3000:] + _log(logs, 1)[-3000:]
    assert f"resumed from step {latest}" in _log(logs, 0)
    saved = [re.findall(r"saved step (\d+), exiting", _log(logs, i)) for i in range(2)]
    assert saved[0] and saved[0] == saved[1], saved
    stop_step = int(saved[0][-1])
    assert stop_step >= latest + 2
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == stop_step
    assert max(pretrain.per_step_losses(workdir)) == stop_step


def test_checkpoint_from_8_devices_continues_on_2_and_1(tiny_dataset, pretrained_workdir):
    cfg = _config(tiny_dataset)
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), 3)  # the key train() uses at step 4
    losses = {}
    for n in (8, 2, 1):
        mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:n])
        run, iterator = _restore_run(cfg, pretrained_workdir, 3, mesh)
        batch = next(iterator)
        out = run.step(sharding.shard_batch({k: batch[k] for k in pretrain.STEP_INPUTS}, mesh), 3, key)
        losses[n] = float(out["total"])
    assert np.isfinite(losses[8])
    assert losses[2] == pytest.approx(losses[8], rel=1e-5)
    assert losses[1] == pytest.approx(losses[8], rel=1e-5)


def test_input_position_maps_across_host_counts(tiny_dataset, tmp_path):
    """A host's position x its host count is the global position (pipeline.HostBlock)."""
    cfg = factory.data_config(_config(tiny_dataset))
    tok = factory.tokenizer(_config(tiny_dataset), str(tmp_path))
    single = pipeline.train_iterator(cfg, tok)
    halves = [pipeline.train_iterator(cfg, tok, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(2):
        whole = next(single)["index"]
        parts = np.concatenate([next(h)["index"] for h in halves])
        np.testing.assert_array_equal(parts, whole)  # the same global batch, row for row
    assert halves[0].get_state()["next_index"] * 2 == single.get_state()["next_index"]


def test_single_process_needs_no_distributed_setup(monkeypatch):
    cfg = _config("")
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.multiprocess_environment() == ""
    assert sharding.initialize_distributed(cfg.distributed) is False
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert sharding.multiprocess_environment() == "SLURM"
    cfg.distributed.enabled = "off"
    assert sharding.initialize_distributed(cfg.distributed) is False
    cfg.distributed.enabled = "sometimes"
    with pytest.raises(ValueError, match="config.distributed.enabled"):
        sharding.initialize_distributed(cfg.distributed)
