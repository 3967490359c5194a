"""mama_jax: multi-view, multi-scale mammography CLIP (MaMA) in JAX / Flax NNX."""


def load(path: str):
    """An exported MaMA package (see mama_jax.export.package) as an InferenceModel.

    Imported lazily so `import mama_jax` stays free of JAX.
    """
    from mama_jax.export.package import load_package

    return load_package(path)
