"""Test-wide settings: 8 forced CPU devices, caches out of home, absl flags parsed."""
import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.path.join(tempfile.gettempdir(), "mama_jax_cache")
for var, sub in (("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl"), ("XDG_CACHE_HOME", "xdg")):
    os.environ.setdefault(var, os.path.join(_cache, sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain 0.2.18 reads an absl flag when iterating; pytest never parses flags.
flags.FLAGS.mark_as_parsed()

# Compiled programs are reused across test processes (the train tests start
# several identical runs); the key is the program itself, so it is never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small synthetic EMBED dataset built once per test session: its TFDS folder."""
    from data_prep import build, synthetic

    root = tmp_path_factory.mktemp("tiny_dataset")
    synthetic.generate(str(root / "raw"), patients=6, seed=1, image_size=(160, 128))
    build.build("embed", str(root / "raw"), str(root / "raw"), str(root / "out"), workers=1,
                long_side=128)
    return build.dataset_dir(str(root / "out"), "embed")


@pytest.fixture(scope="session")
def pretrained_workdir(tiny_dataset, tmp_path_factory):
    """A 3-step demo:test pretraining run (tiny towers, 56 px) on tiny_dataset: its workdir."""
    import json

    from configs import demo
    from mama_jax.train import pretrain

    cfg = demo.get_config("test")
    cfg.data.dataset_dir = tiny_dataset
    cfg.train.steps = 3
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    with open(os.path.join(workdir, "config_pretrain.json"), "w") as f:
        json.dump(json.loads(cfg.to_json_best_effort()), f)
    pretrain.train(cfg, workdir)
    return workdir
