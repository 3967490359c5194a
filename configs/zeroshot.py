"""Zero-shot classification with a pretrained MaMA (spec reference_behaviour.md §4.1).

  python -m mama_jax.main --config=configs/zeroshot.py --workdir=runs/mama/zeroshot \
      --config.pretrain_workdir=runs/mama

prefix: official (each image's own unmasked procedure, reason, patient and image info,
D17) | patient_image | none. aggregate: image | breast (study + laterality) | study:
group probabilities are the mean over the group's images, the group label its highest
class index. double_softmax reproduces the official scores (D10).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/zeroshot.py: unknown preset {arg!r} (none defined)")
    c = ml_collections.ConfigDict()
    c.mode = "zeroshot"
    c.pretrain_workdir = ""   # the pretraining run's --workdir (required)
    c.dataset_dir = ""        # "" = the pretraining run's dataset
    c.split = "test"
    c.step = 0                # checkpoint step to evaluate; 0 = the latest
    c.tasks = ("density", "birads")  # any of birads, density, cancer
    c.prefix = "official"
    c.aggregate = "image"
    c.double_softmax = False
    c.max_length = 0          # prompt tokens; 0 = the pretraining run's data.max_length
    c.batch_size = 32         # images per batch; prompts are encoded in batches of this size too
    c.bootstrap = 200         # bootstrap resamples for the confidence intervals (0 = none)
    c.seed = 0
    return c
