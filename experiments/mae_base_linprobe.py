"""Linear probing of an MAE ViT-B/16 encoder on ImageNet-1k (He et al. 2022, Sec. 4.3;
the reference's main_linprobe.py with --cls_token, following MoCo v3).

Frozen encoder, class token after the final norm, BatchNorm1d(affine=False) + linear
head (trunc-normal 0.01); LARS (momentum 0.9, trust 0.001), base lr 0.1 scaled by
batch/256 (batch 16384: lr 6.4), no weight decay, 90 epochs with 10 warm-up,
RandomResizedCrop + flip only. Reference: 68.0% top-1 (67.8% with the PyTorch code).

    python -m mim.main --config=experiments/mae_base_linprobe.py --workdir=runs/mae_base_lin \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=mae_pretrain_vit_base.pth   # or runs/mae_base (a mim run)

Variants:
    :tiny   the shared tiny encoder on the bundled subset, 150 steps of batch 256; start
            it from a tiny pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_mae_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.linprobe("base", arg, name="mae_base_linprobe.py")
