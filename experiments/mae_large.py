"""MAE pretraining of ViT-L/16 on ImageNet-1k (He et al. 2022; PRETRAIN.md's default
command: 8 nodes x 8 GPUs x 64 = batch 4096).

Same recipe as experiments/mae_base.py (mask 0.75, norm_pix_loss, AdamW (0.9, 0.95),
wd 0.05, blr 1.5e-4 -> lr 2.4e-3, 40 warm-up epochs, 800 epochs; 1600 for the released
checkpoint). Reference: 85.5% fine-tuned after 800 epochs (PRETRAIN.md), 85.9% after
1600 (experiments/mae_large_finetune.py); linear probe 75.8%.

    python -m mim.main --config=experiments/mae_large.py --workdir=runs/mae_large \
        --config.data.path=/data/imagenet

Variants:
    :tiny   the shared tiny model (see experiments/_mae_common.py) on the bundled subset.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_mae_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.pretrain("large", arg, name="mae_large.py")
