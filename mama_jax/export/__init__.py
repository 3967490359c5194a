"""Export packages of a trained MaMA and their use on new mammograms.

  package.py      the folder format: write_package, load_package (mama_jax.load)
  inference.py    InferenceModel: embeddings, zero-shot, heads, predict_dicoms
  heads.py        trained heads a package carries (linear probe, fine-tuned classifier)
  dicom_input.py  DICOM files -> record images via data_prep's reader, safe ids only
  predictions.py  per-image rows and their per-breast / per-study aggregates
  job.py          the export job (configs/export.py)
  hf.py           the vision tower as a transformers Dinov2 folder
"""

from mama_jax.export.errors import PackageError
from mama_jax.export.inference import InferenceModel
from mama_jax.export.job import export_package, run
from mama_jax.export.package import (CONFIG_FILE, FORMAT, FORMAT_VERSION, MODEL_CONFIG_FILE, STATE_DIR,
                                     TOKENIZER_DIR, VIT_HF_DIR, load_package, write_package)

__all__ = ["PackageError", "InferenceModel", "export_package", "run", "load_package", "write_package",
           "CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "MODEL_CONFIG_FILE", "STATE_DIR",
           "TOKENIZER_DIR", "VIT_HF_DIR"]
