"""Sentence-to-patch similarity maps (paper Fig. 3) of a pretrained MaMA.

  python -m mama_jax.main --config=configs/maps.py --workdir=runs/eval \
      --config.pretrain_workdir=runs/mama [--config.image_ids="('id1','id2')"]
"""

import ml_collections


def get_config(arg: str | None = None):
    if arg:
        raise ValueError(f"configs/maps.py: unknown preset {arg!r} (it has none)")
    c = ml_collections.ConfigDict()
    c.mode = "maps"
    c.pretrain_workdir = ""      # a pretraining run's --workdir (required)
    c.step = -1                  # checkpoint step; -1 = the last one (D20)
    c.dataset_dir = ""           # "" = the pretraining config's data.dataset_dir
    c.split = "test"
    c.num_images = 4             # the first images with a mass, topped up with others
    c.image_ids = ()             # or exactly these image ids (overrides num_images)
    c.sentence = "Impressions"   # the sentence shown: the first one starting with this text
    c.max_length = 0             # caption tokens; 0 = the text tower's context (n_positions)
    c.display_size = 448         # PNG side in pixels (the image on the eval canvas)
    c.image_size = 0             # model input side; 0 = pretraining's (a larger one gives a
                                 # finer patch grid: the position table is resized)
    c.score_images = 64          # score maps against lesion boxes on up to this many records
                                 # with boxes (-1 = all, 0 = none); see maps.roi_scores
    return c
