"""Shared pieces of the SimMIM experiment files (Xie et al. 2022; microsoft/SimMIM's
configs/*.yaml, config.py defaults, main_simmim.py, main_finetune.py): the reference
recipes and the CPU-sized ``:tiny`` and ``:perf`` variants. Not an experiment itself;
each ``simmim_*.py`` loads it with ``mim.config.import_sibling``.

Learning rates. The reference scales ``BASE_LR``, ``WARMUP_LR`` and ``MIN_LR`` by
``total batch / 512`` (main_simmim.py, main_finetune.py); mim scales ``optim.base_lr`` by
``batch_size / 256`` and takes ``optim.min_lr`` as an absolute value. So mim's base_lr is
the reference's BASE_LR / 2, and min_lr is the reference's MIN_LR * 2048 / 512 for the
reference's global batch of 2048 (16 GPUs x 128, README.md); change it with the batch.

``:tiny`` is one small encoder per backbone on the bundled 32-px CIFAR-10 subset, the
same for pretraining and fine-tuning, so a tiny pretraining run's workdir plugs into the
fine-tuning file with ``--config.init.checkpoint=<workdir>``.
"""

import ml_collections

from mim import config as config_lib
from mim.models import beit, simmim, swin
from mim.tasks import linprobe as linprobe_task

shared = config_lib.import_sibling(__file__, "_common.py")

REFERENCE_BATCH = 2048      # README.md: 16 GPUs x --batch-size 128, pretraining and fine-tuning


def per_256(reference_lr: float) -> float:
    """mim's ``optim.base_lr`` (per 256 images) for a reference ``TRAIN.BASE_LR`` (per 512)."""
    return reference_lr * 256 / 512


def absolute(reference_lr: float, batch: int = REFERENCE_BATCH) -> float:
    """The reference's linear scaling of a per-512 lr (main_simmim.py)."""
    return reference_lr * batch / 512


# ----------------------------------------------------------------------------------------
# Tiny: 32-px images. Swin with 4-px patches (an 8x8 grid) and two stages, so the
# encoder stride is 8 and each 8-px mask patch is one output feature, as each 32-px mask
# patch is for Swin-B (stride 32). ViT with 4-px patches and the same 8-px mask patches
# (2x2 tokens, as 32 / 16 for ViT-B); its relative position bias tables are for the 8x8
# grid, (2*8-1)^2 + 3 rows.

TINY_SWIN = dict(img_size=32, patch_size=4, embed_dim=64, depths=(2, 2), num_heads=(2, 4),
                 window_size=4)
TINY_SWIN_FINETUNE_WINDOW = 8   # a window change at fine-tuning, as 6 -> 7 in the reference
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4)
TINY_MASK_PATCH = 8
TINY_CLASSES = 10


# ----------------------------------------------------------------------------------------
# Pretraining (main_simmim.py).

# Per (backbone, epochs): the yaml's TRAIN.BASE_LR, MIN_LR and WARMUP_LR (per 512 images)
# and LR_SCHEDULER.MULTISTEPS (GAMMA 0.1), empty for the cosine configs. Swin-B: the
# 100-epoch config (cosine, the default) or the 800-epoch one; ViT-B: the 800-epoch config.
PRETRAIN = {("swin", 100): (2e-4, 1e-5, 1e-6, ()),
            ("swin", 800): (1e-4, 0.0, 5e-7, (700.0,)),
            ("vit", 800): (1e-4, 0.0, 5e-7, (700.0,))}
PRETRAIN_EPOCHS = {"swin": 100, "vit": 800}
# TRAIN.WARMUP_LR of the fine-tuning yaml files (per 512).
WARMUP_LR = {"finetune": {"swin": 2.5e-7, "vit": 2.5e-7}}


def pretrain(backbone: str, arg=None, name: str = "simmim"):
    v = shared.parse_arg(arg, name, epochs=PRETRAIN_EPOCHS[backbone])
    shared.check_choice(v.epochs, sorted(e for b, e in PRETRAIN if b == backbone), "epochs", name)
    c = config_lib.base()
    c.task = "simmim_pretrain"
    if backbone == "swin":
        # Swin-B, 192 px, window 6, no stochastic depth (DROP_PATH_RATE 0.0).
        c.model = simmim.config("swin")
    else:
        # ViT-B/16 at 224 px, BEiT-style (config.py's VIT defaults and the yaml): no absolute
        # position embedding, one relative position bias shared by the blocks, q/v biases,
        # layer scale 0.1 (VIT.INIT_VALUES), drop path 0.1.
        c.model = simmim.config("vit", encoder=dict(
            drop_path_rate=0.1, layer_scale_init=0.1, use_abs_pos_emb=False,
            use_shared_rel_pos_bias=True, use_rel_pos_bias=False, qkv_bias=True))
    c.model.update(mask_patch_size=32, mask_ratio=0.6)   # DATA.MASK_PATCH_SIZE / MASK_RATIO
    base_lr, min_lr, warmup_lr, milestones = PRETRAIN[backbone, v.epochs]
    epochs = float(v.epochs)
    c.batch_size = REFERENCE_BATCH
    c.eval_batch_size = 1024
    c.epochs = epochs
    c.data.image_size = c.model.encoder.img_size
    # SimMIMTransform (data_simmim.py): RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3))
    # with torchvision's default bilinear resampling, flip; nothing else.
    c.data.crop_scale = (0.67, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.interpolation = "bilinear"
    c.data.num_workers = 8
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.base_lr = per_256(base_lr)
    c.optim.min_lr = absolute(min_lr)
    c.optim.warmup_init_lr = absolute(warmup_lr)
    # lr_scheduler.build_scheduler, stepped after each optimizer step in micro-batches
    if milestones:
        c.optim.schedule = "timm_multistep"
        c.optim.milestones = milestones
        c.optim.gamma = 0.1
    else:
        c.optim.schedule = "timm_cosine"
    c.optim.warmup_epochs = 10.0
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 5.0        # TRAIN.CLIP_GRAD, after every backward (train_one_epoch)
    c.optim.clip_mode = "micro_batch"
    c.precision = "amp_bf16"       # the reference: apex O1 (fp16 autocast); amp_fp16 for that
    c.log_every = 100              # PRINT_FREQ
    c.recon = ml_collections.ConfigDict(dict(
        every=3125,                # steps between reconstruction pictures (5 epochs); 0: none
        num_images=8,              # fixed eval-split images in each picture
    ))
    if v.tiny:
        shared.tiny_data(c)
        enc = TINY_SWIN if backbone == "swin" else dict(TINY_VIT, drop_path_rate=0.0)
        c.model.encoder.update(enc)
        c.model.mask_patch_size = TINY_MASK_PATCH
        # A short run needs a larger base lr than the 100/800-epoch schedules.
        shared.tiny_schedule(c, batch_size=128, steps=600, every=300, warmup_steps=30,
                             base_lr=2e-3, warmup_init_lr=0.0, min_lr=0.0 if milestones else 1e-5)
        if milestones:  # x0.1 at 7/8 of the run, as at epoch 700 of 800
            c.optim.milestones = (round(600 * 7 / 8 * 128 / shared.BUNDLED_TRAIN_IMAGES, 2),)
        c.recon.every = 300
    if v.perf:
        shared.perf(c)
        c.recon.every = 0
    return shared.finish(c, v)


# ----------------------------------------------------------------------------------------
# Fine-tuning (main_finetune.py): the classify task on the pretrained encoder.

# Per backbone: reference TRAIN.BASE_LR and MIN_LR (per 512), LAYER_DECAY.
FINETUNE = {"swin": (1.25e-3, 2.5e-7, 0.9), "vit": (1.25e-3, 2.5e-7, 0.65)}


def finetune(backbone: str, arg=None, name: str = "simmim_finetune"):
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "classify"
    if backbone == "swin":
        # Swin-B at 224 px, window 7: the 6 -> 7 window change interpolates the relative
        # position bias tables at load time (mim.checkpoints.swin.load_for_finetune).
        dim, depths, heads = swin.SIZES["base"]
        c.model = swin.config(img_size=224, embed_dim=dim, depths=depths, num_heads=heads,
                              window_size=7, drop_path_rate=0.1, num_classes=1000)
    else:
        # ViT-B/16, BEiT-style as the fine-tuning yaml: relative position bias in every block
        # (VIT.USE_RPB; the pretrained shared table is copied into each at load time), no
        # absolute position embedding, mean pooling + fc_norm (VIT.USE_MEAN_POOLING), layer
        # scale 0.1, q/v biases, head trunc-normal(0.02) scaled by init_scale 0.001
        # (vision_transformer.py).
        c.model = beit.config(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=224,
                              num_classes=1000, use_abs_pos_emb=False, use_rel_pos_bias=True,
                              use_shared_rel_pos_bias=False, layer_scale_init=0.1, qkv_bias=True,
                              global_pool="avg", drop_path_rate=0.1, init_scale=0.001)
    base_lr, min_lr, layer_decay = FINETUNE[backbone]
    c.init.format = "swin"         # SimMIM checkpoints, either backbone (mim.checkpoints.swin)
    c.batch_size = REFERENCE_BATCH
    c.eval_batch_size = 1024
    c.epochs = 100.0
    c.data.image_size = 224
    c.data.interpolation = "bicubic"
    c.data.crop_pct = 224 / 256    # eval: resize 256, centre crop 224 (TEST.CROP)
    # data_finetune.build_transform with config.py's AUG defaults. timm ignores the colour
    # jitter when RandAugment is on; it is kept at the reference's value.
    c.data.crop_scale = (0.08, 1.0)
    c.data.color_jitter = 0.4
    c.data.auto_augment = "rand-m9-mstd0.5-inc1"
    c.data.re_prob = 0.25
    c.data.re_mode = "pixel"
    c.data.re_count = 1
    c.data.mixup = 0.8
    c.data.cutmix = 1.0
    c.data.mixup_prob = 1.0
    c.data.mixup_switch_prob = 0.5
    c.data.label_smoothing = 0.1   # MODEL.LABEL_SMOOTHING, folded into the mixup targets
    c.data.num_workers = 8
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.base_lr = per_256(base_lr)
    c.optim.min_lr = absolute(min_lr)
    c.optim.warmup_init_lr = absolute(WARMUP_LR["finetune"][backbone])
    c.optim.schedule = "timm_cosine"
    c.optim.warmup_epochs = 20.0
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = layer_decay
    c.optim.clip_grad = 5.0
    c.optim.clip_mode = "micro_batch"
    c.precision = "amp_bf16"
    c.log_every = 100
    if v.tiny:
        shared.tiny_data(c)
        if backbone == "swin":
            c.model.update(TINY_SWIN, window_size=TINY_SWIN_FINETUNE_WINDOW, num_classes=TINY_CLASSES)
        else:
            c.model.update(TINY_VIT, num_classes=TINY_CLASSES)
        shared.tiny_schedule(c, batch_size=128, steps=300, warmup_steps=30, base_lr=2e-3,
                             min_lr=1e-5, warmup_init_lr=0.0)
        # RandAugment, erasing and mixup/cutmix on 32-px images in a 300-step run only add
        # noise to the comparison this variant is for (pretrained vs random init).
        c.data.auto_augment = ""
        c.data.color_jitter = 0.0
        c.data.re_prob = 0.0
        c.data.mixup = 0.0
        c.data.cutmix = 0.0
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)


# ----------------------------------------------------------------------------------------
# Linear probing. SimMIM's repository has no linear evaluation (the paper evaluates Swin-B
# by fine-tuning); this applies MAE's protocol (main_linprobe.py) to the frozen pretrained
# encoder, so SimMIM's rows sit beside MAE's in docs/results.md.


def linprobe(backbone: str, arg=None, name: str = "simmim_linprobe"):
    if backbone != "swin":
        raise ValueError(f"{name}: a linear probe is defined for the Swin backbone only")
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "linprobe"
    # Swin-B at 224 px with window 7, as fine-tuning reads it (the pretraining window 6
    # interpolated at load time); the head reads the average-pooled final-norm features.
    dim, depths, heads = swin.SIZES["base"]
    c.model = swin.config(img_size=224, embed_dim=dim, depths=depths, num_heads=heads,
                          window_size=7, drop_path_rate=0.0, num_classes=1000,
                          head_init_std=0.01)
    # MAE's head: BatchNorm1d(affine=False) + linear (trunc-normal 0.01), LARS base lr 0.1
    # per 256, momentum 0.9, no weight decay, 90 epochs with 10 warm-up, batch 16384.
    c.probe = linprobe_task.probe_config("pooled", batch_norm=True)
    c.init.format = "swin"
    c.batch_size = 16384
    c.eval_batch_size = 1024
    c.epochs = 90.0
    c.data.image_size = 224
    c.data.interpolation = "bicubic"
    c.data.crop_scale = (0.08, 1.0)  # weak augmentation: RandomResizedCrop + flip only
    c.data.crop_pct = 224 / 256
    c.data.num_workers = 8
    c.optim.name = "lars"
    c.optim.base_lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 0.0
    c.optim.warmup_epochs = 10.0
    c.optim.min_lr = 0.0
    c.precision = "amp_bf16"
    c.log_every = 20
    if v.tiny:
        shared.tiny_data(c)
        # The pretraining's window (4): the probe reads the features as pretrained.
        c.model.update(TINY_SWIN, num_classes=TINY_CLASSES)
        # As mae_base_linprobe.py:tiny: 150 steps of 256 at LARS lr 30 (see _mae_common.py).
        shared.tiny_schedule(c, batch_size=256, steps=150, warmup_steps=15, base_lr=30.0)
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)
