"""The paper's pretraining recipe (MaMA, §4.1): DINOv2 ViT-B/14-reg at 518 px,
BioMedLM + LoRA, d 512, global batch 144, 40k steps, delta 8k, m 0.8, bf16.

  python -m mama_jax.main --config=configs/pretrain.py --workdir=runs/mama \
      --config.data.dataset_dir=/data/mama/embed/tfds/mammography/embed/1.0.0 \
      --config.model.vit_weights=/models/dinov2_vitb14_reg4_pretrain.pth \
      --config.model.text_weights=/models/BioMedLM --config.model.tokenizer=/models/BioMedLM

Presets via the argument: `configs/pretrain.py:smoke` shrinks steps and batch
for a first run on new hardware.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        dataset_dir="",               # OUT/tfds/mammography/embed/1.0.0 from `python -m data_prep build`
        image_size=518,
        global_batch_size=144,        # the batch the loss sees (negatives, BatchNorm)
        max_length=144,
        second_view="intra_study",    # same_image | intra_side | intra_study_no_self (Table 5)
        p_self=0.5,                   # D16: anchor re-augmented (intra_study, intra_side)
        caption_style="structured",   # structured_nomask | tabular | label_only (Table 6)
        mask_prob=0.8,                # meta-information masking m
        num_threads=8,
        prefetch=4,
        transfer="grey",              # grey: uint16 [S, S] views, normalised on the device |
                                      # rgb_float32: float32 [S, S, 3] from the host (6x the bytes)
        # SimCLR-style augmentation of both views (spec §3.4)
        crop_scale=(0.1, 1.0),
        hflip=0.5,
        vflip=0.5,
        jitter_prob=0.8,
        brightness=0.8,
        contrast=0.8,
        blur_prob=0.4,
    ))

    c.model = ml_collections.ConfigDict(dict(
        vit="base",                   # tiny | small | base | large (random init only)
        num_registers=4,
        vit_layerscale_init=1e-5,     # random init only (pretrained weights bring their own)
        vit_weights="",               # transformers Dinov2 folder, torch-hub .pth, or converted tower
        text="biomedlm",              # tiny | biomedlm (random init only)
        text_weights="",              # transformers GPT-2 folder or converted tower
        tokenizer="stanford-crfm/BioMedLM",  # local folder or hub id
        random_init=False,            # allow training without pretrained weights
        embed_dim=512,
        local_hidden=2048,
        simclr_out=512,
        text_pool="last",             # masked_mean | official (D7)
        max_sentences=16,
        sentence_features="sep",      # sep (paper) | token_mean (no context; the demo's choice)
        freeze_llm=False,             # D5: LoRA frozen too (the official run's effective setting)
        train_text_base=False,        # train the whole decoder (random-init runs such as the demo)
        lora_rank=8,
        lora_alpha=32.0,
        lora_dropout=0.1,
        lora_targets=("c_attn",),     # D6; add "mlp_c_proj" for the intended list
        dtype="bfloat16",             # compute
        text_param_dtype="bfloat16",  # the frozen decoder base
        scan_layers=True,
        remat=True,
        attention_impl="",            # "" (XLA default) | cudnn
    ))

    c.loss = ml_collections.ConfigDict(dict(
        delta=8000,                   # local loss off before this optimizer step
        aux_start_step=-1,            # D1 official: 8000 gates L_VV and L_VT(v~,t) too; -1 = off
        directions="mean",            # sum = official (D2)
        clip_directions="",           # "" = directions; i2t = image-to-text CE only
        use_vv=True,
        use_second_view_clip=True,    # False = Table 4 "w/o symmetric L_VT" (L_VT for view 1 only)
        use_local=True,
        nt_xent_temperature=0.5,      # D15
        caption_chunk=0,              # 0 = automatic
        max_log_scale=4.6052,         # clamp ln(100) as CLIP; 0 = no clamp (official)
        negatives="global",           # per_device = official CLIP / local negatives (D3)
        # Image-text terms of eq. 4: softmax = CLIP (eq. 2, paper); sigmoid = SigLIP (a learnt
        # bias joins the model; no global softmax, suits small per-device batches).
        clip_kind="softmax",
        local_half="both",            # eq. 3; visual / text = only L^V / L^T (an ablation)
    ))

    # Every step count in every config counts optimizer updates (one per global batch).
    c.optim = ml_collections.ConfigDict(dict(
        lr=4e-5, warmup_steps=4000, total_steps=40000, weight_decay=0.1,
        b1=0.9, b2=0.999, init_lr=1e-8, end_lr=1e-8,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=40000, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
        # Split the global batch into this many micro-batches (exact accumulation,
        # mama_jax/train/grad_cache.py): the loss still sees the whole batch, memory holds one
        # micro-batch's tower activations. docs/scaling.md gives k per GPU set-up.
        micro_batches=1,
        # Zero-shot density / BI-RADS / cancer bACC and AUC on the validation split every
        # this many steps (metrics.jsonl and TensorBoard "val_zs/..."; 0 = off). Each one
        # encodes the whole split and its prompts once with the live model.
        eval_every=2000,
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # devices: data x fsdp, -1 = the rest

    # Multi-process runs (docs/scaling.md). "auto" starts jax.distributed under
    # SLURM, Open MPI, a TPU pod slice or JAX_COORDINATOR_ADDRESS, or when a
    # coordinator / process count is given; fields left empty are detected.
    c.distributed = ml_collections.ConfigDict(dict(
        enabled="auto",               # auto | on | off
        coordinator_address="",       # host:port of process 0
        num_processes=0,              # 0 = detect
        process_id=-1,                # -1 = detect
        local_device_ids="",          # e.g. "0,1,2,3"; "" = all of this host's devices
        initialization_timeout=300,   # s to wait for every process to connect
        heartbeat_timeout=100,        # s without a heartbeat before a process counts as dead
    ))
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    if arg == "smoke":
        c.data.global_batch_size = 8
        c.train.steps = 20
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.optim.warmup_steps = 5
        c.optim.total_steps = 20
        c.loss.delta = 10
    elif arg:
        raise ValueError(f"configs/pretrain.py: unknown preset {arg!r} (known: smoke)")
    return c
