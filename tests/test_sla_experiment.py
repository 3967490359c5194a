"""Smoke test of experiments/sla_localisation.py: a few steps of one arm, end to end.

The experiment itself (minutes per run) runs outside the suite; this keeps its data
generation, training child, scoring and table working.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import sla_localisation
from mama_jax import factory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sla")
    out = work / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sla_localisation.py"), "--smoke",
         "--work", str(work), "--patients", "10", "--arms", "sla", "--seeds", "0",
         "--split", "validation", "--diagnostics", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        # one CPU device (the suite forces 8): the experiment runs on one, and compiles faster
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_prints_one_table_with_maps_identity_and_global_figures(smoke_run):
    stdout, result = smoke_run
    assert "SLA localisation on the validation split" in stdout
    run = result["results"]["sla"]["0"]
    assert run["split"] == "validation" and run["n_images"] > 0
    assert run["maps"] and run["maps_bn_batch"]  # per sentence kind, both BatchNorm modes
    for summary in run["maps"].values():
        assert 0.0 <= summary["hit_rate"] <= 1.0 and 0.0 < summary["chance_hit_rate"] <= 1.0
    for key in ("c_v_rank", "c_t_rank"):  # (at 64 tokens the mass sentence may be cut off)
        assert 0.0 <= run["identity"][key] <= 1.0
    assert {"zs_density_bacc", "lp_density_auc"} <= set(run["global"])


def test_nosla_arm_switches_the_local_loss_off_and_halves_reach_the_loss():
    cfg = sla_localisation.run_config("/nowhere", 3, sla_localisation.ARMS["nosla"], smoke=True)
    assert cfg.loss.use_local is False and cfg.seed == 3
    for half in ("visual", "text"):  # the config key reaches the loss options
        cfg = sla_localisation.run_config("/nowhere", 0, sla_localisation.ARMS[half], smoke=True)
        assert factory.loss_options(cfg).local_half == half
    cfg.loss.local_half = "both_halves"
    with pytest.raises(ValueError, match="local_half"):
        factory.loss_options(cfg)


def test_must_hold_reads_the_mass_sentence_per_seed():
    good = {"The mass": {"mean_lift": 1.5, "hit_rate": 0.6, "chance_hit_rate": 0.25}}
    bad = {"The mass": {"mean_lift": 1.5, "hit_rate": 0.4, "chance_hit_rate": 0.25}}
    lines = sla_localisation.must_hold({"sla": {0: {"maps": good}, 1: {"maps": bad}}}, [0, 1],
                                       kinds=("The mass",))
    assert "-> localises" in lines[0] and "does not localise" in lines[1] and len(lines) == 2


def test_local_loss_halves_average_to_eq3():
    """The ablation switch: with directions="mean", eq. 3 is the mean of its two halves."""
    import numpy as np

    from mama_jax import losses

    rng = np.random.default_rng(0)
    sent, patch = rng.normal(size=(4, 3, 8)), rng.normal(size=(4, 5, 8))
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], bool)
    both, vis, txt = (float(losses.local_loss(sent, mask, patch, 1.0, half=h))
                      for h in ("both", "visual", "text"))
    assert abs(both - 0.5 * (vis + txt)) < 1e-5 and abs(vis - txt) > 1e-4
    with pytest.raises(ValueError, match="half"):
        losses.local_loss(sent, mask, patch, 1.0, half="neither")
