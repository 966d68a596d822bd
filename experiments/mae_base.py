"""MAE pretraining of ViT-B/16 on ImageNet-1k (He et al. 2022; the reference's
PRETRAIN.md with `--model mae_vit_base_patch16`).

75% random masking, 8-block 512-d decoder, normalised-pixel targets; AdamW
(0.9, 0.95), weight decay 0.05, base lr 1.5e-4 scaled by batch/256 (global batch 4096:
lr 2.4e-3), 40 warm-up epochs then cosine, 800 epochs (1600 for the released
checkpoint: add --config.epochs=1600), RandomResizedCrop scale (0.2, 1) + flip.
Reference: fine-tuned 83.6% top-1 (experiments/mae_base_finetune.py), linear probe 68.0%
(experiments/mae_base_linprobe.py), both from the 1600-epoch model.

    python -m mim.main --config=experiments/mae_base.py --workdir=runs/mae_base \
        --config.data.path=/data/imagenet

Variants:
    :tiny   a 4-block, 128-d ViT (patch 4) on the bundled 32-px CIFAR-10 subset, 600 steps
            on 2 CPU cores; see docs/mae.md for what it reaches downstream.
    :perf   50 steps that print throughput (images/s per device).
    :size=large / :size=huge   the same recipe for ViT-L/16 or ViT-H/14.
    :tiny,steps=N               any variant cut to N optimizer steps.

Sweeps (python -m mim.sweep, see docs/mae.md): mask_ratio (Figure 5), decoder_depth
(Table 1a); with :tiny a 4-point / 3-point subset:

    python -m mim.sweep --config=experiments/mae_base.py:tiny --sweep=mask_ratio \
        --workdir=runs/mae_mask_ratio --then=experiments/mae_base_linprobe.py:tiny
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_mae_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.pretrain("base", arg, name="mae_base.py")


def get_sweeps(arg=None):
    return common.pretrain_sweeps(arg, name="mae_base.py")
