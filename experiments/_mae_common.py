"""Shared pieces of the MAE experiment files (He et al. 2022): the recipes of the
reference's PRETRAIN.md / FINETUNE.md, and the CPU-sized ``:tiny`` and ``:perf``
variants. Not an experiment itself; each ``mae_*.py`` loads it with ``mim.config.import_sibling``.

``:tiny`` is one small ViT (patch 4 on 32-px images: an 8x8 grid, as 224 px / 16 gives
14x14) on the bundled CIFAR-10 subset, the same encoder for pretraining, fine-tuning
and linear probing, so a tiny pretraining run's checkpoint plugs into the other two.
"""
import ml_collections

from mim import config as config_lib
from mim.models import mae, vit
from mim.tasks import linprobe as linprobe_task

shared = config_lib.import_sibling(__file__, "_common.py")

# The tiny encoder: 4 blocks of width 128 (64 patches of 4x4 px, 16 visible at 75%).
TINY_ENCODER = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4)
# The decoder keeps the paper's shape relative to the encoder: narrower, lighter (Sec. 3).
TINY_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
TINY_CLASSES = 10


# ----------------------------------------------------------------------------------------
# Pretraining (main_pretrain.py, PRETRAIN.md).


def pretrain(size: str, arg=None, name: str = "mae"):
    v = shared.parse_arg(arg, name, size=size)
    shared.check_choice(v.size, tuple(mae.SIZES), "size", name)
    size = v.size
    c = config_lib.base()
    c.task = "mae_pretrain"
    # norm_pix_loss: per-patch normalised pixel targets (Sec. 3, Table 1d), the
    # released models' setting.
    c.model = mae.config(**mae.SIZES[size], img_size=224, norm_pix_loss=True, mask_ratio=0.75)
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.epochs = 800.0               # 1600 for the released checkpoints (FINETUNE.md notes)
    c.data.image_size = 224
    c.data.crop_scale = (0.2, 1.0)  # RandomResizedCrop(224, scale=(0.2, 1.0)) (Sec. A.1)
    c.data.interpolation = "bicubic"
    c.data.num_workers = 10
    c.optim.name = "adamw"
    c.optim.base_lr = 1.5e-4       # lr = blr * 4096 / 256 = 2.4e-3
    c.optim.b1, c.optim.b2 = 0.9, 0.95  # Sec. A.1, Table 8
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 40.0
    c.optim.min_lr = 0.0
    c.precision = "amp_bf16"
    c.log_every = 50
    c.eval_every = 0
    c.recon = ml_collections.ConfigDict(dict(
        every=5000,                # steps between reconstruction pictures (0: none)
        num_images=8,              # fixed eval-split images in each picture
    ))
    if v.tiny:
        shared.tiny_data(c)
        c.model.update(**TINY_ENCODER, **TINY_DECODER)
        # A short run needs a larger base lr than the 800-epoch schedule.
        shared.tiny_schedule(c, batch_size=128, steps=600, every=300, warmup_steps=40, base_lr=2e-3)
        c.recon.every = 300
    if v.perf:
        shared.perf(c)
        c.recon.every = 0
    return shared.finish(c, v)


def pretrain_sweeps(arg=None, name: str = "mae"):
    """Named ablations of the pretraining (``python -m mim.sweep --sweep=NAME``), as
    override lists. Full recipe: the paper's grids; ``:tiny``: a 4-point subset that
    fits a CPU."""
    v = shared.parse_arg(arg, name, size="base")
    if v.tiny:
        ratios, depths = (0.25, 0.5, 0.75, 0.9), (1, 2, 4)
    else:
        # Figure 5: masking ratio 10%-90%; Table 1a: decoder depth 1-12 blocks.
        ratios, depths = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9), (1, 2, 4, 8, 12)
    return {
        "mask_ratio": [{"model.mask_ratio": r} for r in ratios],
        "decoder_depth": [{"model.decoder_depth": d} for d in depths],
    }


# ----------------------------------------------------------------------------------------
# Fine-tuning (main_finetune.py, FINETUNE.md): the classify task on an MAE encoder.


def finetune(size: str, arg=None, *, base_lr: float, layer_decay: float, drop_path: float,
             epochs: float, name: str = "mae_finetune"):
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "classify"
    enc = mae.SIZES[size]
    # Global average pooling + fc_norm (Sec. A.1, the reference's --global_pool default);
    # head trunc-normal(2e-5) as main_finetune.py.
    c.model = vit.config(
        patch_size=enc["patch_size"], embed_dim=enc["embed_dim"], depth=enc["depth"],
        num_heads=enc["num_heads"], img_size=224, num_classes=1000, global_pool="avg",
        drop_path_rate=drop_path, head_init_std=2e-5)
    c.init.format = "mae"
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.epochs = epochs
    c.data.image_size = 224
    c.data.interpolation = "bicubic"
    c.data.crop_pct = 224 / 256    # eval: resize to 256, centre crop 224
    c.data.auto_augment = "rand-m9-mstd0.5-inc1"
    c.data.re_prob = 0.25          # random erasing as DeiT (FINETUNE.md)
    c.data.re_mode = "pixel"
    c.data.mixup = 0.8
    c.data.cutmix = 1.0
    c.data.label_smoothing = 0.1
    c.data.num_workers = 10
    c.optim.name = "adamw"
    c.optim.base_lr = base_lr
    c.optim.layer_decay = layer_decay
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 5.0
    c.optim.min_lr = 1e-6
    c.precision = "amp_bf16"
    c.log_every = 50
    if v.tiny:
        shared.tiny_data(c)
        c.model.update(**TINY_ENCODER, num_classes=TINY_CLASSES)
        shared.tiny_schedule(c, batch_size=128, steps=300, warmup_steps=30, base_lr=2e-3)
        # RandAugment and erasing on 32-px images from a short run only add noise.
        c.data.auto_augment = ""
        c.data.re_prob = 0.0
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)


# ----------------------------------------------------------------------------------------
# Linear probing (main_linprobe.py, FINETUNE.md "Linear Probing").


def linprobe(size: str, arg=None, name: str = "mae_linprobe"):
    v = shared.parse_arg(arg, name, size=size)
    shared.check_choice(v.size, tuple(mae.SIZES), "size", name)
    size = v.size
    c = config_lib.base()
    c.task = "linprobe"
    enc = mae.SIZES[size]
    # Class token after the encoder's final norm (--cls_token); head trunc-normal(0.01).
    c.model = vit.config(patch_size=enc["patch_size"], embed_dim=enc["embed_dim"],
                         depth=enc["depth"], num_heads=enc["num_heads"], img_size=224,
                         num_classes=1000, global_pool="token", head_init_std=0.01)
    # The pooled features (class token after the final norm) through BatchNorm1d(affine=False).
    c.probe = linprobe_task.probe_config("pooled", batch_norm=True)
    c.init.format = "mae"
    c.batch_size = 16384
    c.eval_batch_size = 1024
    c.epochs = 90.0
    c.data.image_size = 224
    c.data.interpolation = "bicubic"
    c.data.crop_scale = (0.08, 1.0)  # weak augmentation: RandomResizedCrop + flip only
    c.data.crop_pct = 224 / 256
    c.data.num_workers = 10
    c.optim.name = "lars"
    c.optim.base_lr = 0.1          # lr = 0.1 * 16384 / 256 = 6.4
    c.optim.momentum = 0.9
    c.optim.weight_decay = 0.0     # following MoCo v1
    c.optim.warmup_epochs = 10.0
    c.optim.min_lr = 0.0
    c.precision = "amp_bf16"
    c.log_every = 20
    if v.tiny:
        shared.tiny_data(c)
        c.model.update(**TINY_ENCODER, num_classes=TINY_CLASSES)
        # LARS moves each matrix by about lr * 0.001 of its norm per step (You et al. 2017):
        # the reference's 7,000 steps at lr 6.4 become 150 steps at lr 30.
        shared.tiny_schedule(c, batch_size=256, steps=150, warmup_steps=15, base_lr=30.0)
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)
