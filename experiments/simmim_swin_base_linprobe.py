"""Linear probing of a SimMIM Swin-B encoder on ImageNet-1k. SimMIM's repository has no
linear evaluation; this is MAE's protocol (main_linprobe.py) on the frozen encoder:
average-pooled final-norm features, BatchNorm1d(affine=False) + linear head (trunc-normal
0.01), LARS (momentum 0.9), base lr 0.1 per 256 (batch 16384: lr 6.4), no weight decay,
90 epochs with 10 warm-up, RandomResizedCrop + flip only. The encoder runs at 224 px with
window 7, as fine-tuning reads the 192-px window-6 pretraining (relative position tables
interpolated at load time, mim.checkpoints.swin). There is no published top-1 to compare
with: SimMIM reports fine-tuning only for Swin-B (83.5% top-1 after 100 pretraining
epochs, 84.0% after 800).

    python -m mim.main --config=experiments/simmim_swin_base_linprobe.py --workdir=runs/simmim_lin \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=runs/simmim_swin_base   # or simmim_pretrain__swin_base__*.pth

Variants:
    :tiny   the tiny Swin of simmim_swin_base.py:tiny at its pretraining window (4), 150
            steps of batch 256 as mae_base_linprobe.py:tiny; start it from a tiny
            pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_simmim_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.linprobe("swin", arg, name="simmim_swin_base_linprobe.py")
