"""The embedded default: tiny towers on the synthetic dataset, a few hundred
steps on a laptop CPU. `make demo` builds the data and runs this:

  python -m mama_jax.main --config=configs/demo.py --workdir=work/demo \
      --config.data.dataset_dir=work/dataset/tfds/mammography/embed/1.0.0

No pretrained weights: both towers start from random init and the tokenizer is
a tiny BPE trained on the dataset's own captions (written to WORKDIR/tokenizer).
"""

from configs import pretrain


def get_config(arg: str | None = None):
    c = pretrain.base_config()
    c.mode = "pretrain"
    c.data.image_size = 112
    c.data.global_batch_size = 16
    c.data.max_length = 128  # the longest synthetic caption is ~123 tokens of the demo BPE
    c.data.num_threads = 4
    c.data.prefetch = 2
    # Gentler views than the paper's: a 2-layer ViT at 112 px learns density from
    # brightness and texture, which strong crops and intensity jitter hide.
    c.data.crop_scale = (0.5, 1.0)
    c.data.jitter_prob = 0.2
    c.data.brightness = 0.2
    c.data.contrast = 0.2
    # Sentence features for the local loss: the mean embedding of each sentence's own
    # tokens, not the LM's SEP states (the paper's, with a pretrained LLM). The SEP states
    # of this from-scratch 2-layer LM match the image's identity, not its lesion
    # (experiments/sla_localisation.py; README, "Does the local alignment localise?").
    # configs/pretrain.py keeps SEP states.
    #
    # Captions and loss schedule for maps that find the mass (the same experiment, settings
    # chosen on its validation split over 3 seeds): one lesion sentence per caption
    # (one_finding: "The mass is ..." where there is one, no BI-RADS block: with four lesion
    # sentences which one takes the lesion changed with the seed), every meta field masked
    # (age, side, view... let the local loss match captions to images by identity rather
    # than by the lesion) and the local loss on from step 0. Without BI-RADS words in the
    # captions, zero-shot BI-RADS is at chance in this demo; density keeps its sentence.
    c.data.caption_style = "one_finding"
    c.data.mask_prob = 1.0
    c.model.update(dict(
        vit="tiny", num_registers=4, text="tiny", tokenizer="", random_init=True,
        train_text_base=True, vit_layerscale_init=1.0, sentence_features="token_mean",
        embed_dim=64, local_hidden=128, simclr_out=64, max_sentences=12,
        dtype="float32", text_param_dtype="float32", scan_layers=True, remat=False,
    ))
    c.loss.delta = 0
    c.loss.clip_kind = "softmax"  # or sigmoid (SigLIP): --config.loss.clip_kind=sigmoid
    c.optim.update(dict(lr=1e-3, warmup_steps=30, total_steps=600, weight_decay=0.05))
    # Validation zero-shot 6 times in 600 steps (24 images; a few % of the run's time).
    c.train.update(dict(steps=600, log_every=25, checkpoint_every=200, keep_checkpoints=2,
                        eval_every=100))
    if arg == "test":  # a handful of steps, for the test suite
        # the suite's fixtures read the paper's captions (BI-RADS sentences, meta masking)
        c.data.caption_style = "structured"
        c.data.mask_prob = 0.8
        c.data.image_size = 56
        c.data.global_batch_size = 8
        c.data.max_length = 64
        c.loss.delta = 2
        c.optim.update(dict(warmup_steps=2, total_steps=6))
        c.train.update(dict(steps=6, log_every=1, checkpoint_every=3, eval_every=0))
    elif arg:
        raise ValueError(f"configs/demo.py: unknown preset {arg!r} (known: test)")
    return c
