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
