"""Export packages of a trained MaMA and their use on new mammograms.

  package.py      the folder format: write_package, load_package (mama_jax.load)
  inference.py    InferenceModel: embeddings, zero-shot, heads, predict_dicoms
  heads.py        trained heads a package carries (linear probe, fine-tuned classifier)
  dicom_input.py  DICOM files -> record images via data_prep's reader, safe ids only
  predictions.py  per-image rows and their per-breast / per-study aggregates
  job.py          the export job (configs/export.py)
  hf.py           the vision tower as a transformers Dinov2 folder
"""

import importlib

# Loaded on first use, so that a DICOM reader process (dicom_input) imports no JAX.
_WHERE = {"PackageError": "errors", "InferenceModel": "inference", "export_package": "job",
          "run": "job", "load_package": "package", "write_package": "package",
          **{name: "package" for name in ("CONFIG_FILE", "FORMAT", "FORMAT_VERSION",
                                          "MODEL_CONFIG_FILE", "STATE_DIR", "TOKENIZER_DIR",
                                          "VIT_HF_DIR")}}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mama_jax.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mama_jax.export.{_WHERE[name]}"), name)
