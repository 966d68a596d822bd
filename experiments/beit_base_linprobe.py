"""Linear probing of a BEiT-B/16 encoder on ImageNet-1k (microsoft/unilm beit/
run_linear_eval.py; README "Linear probe on ImageNet"): the linprobe task with one linear
classifier per block on concat(class token, mean of the patch tokens) of that block's
output (before the final norm), all trained together on the sum of their losses; the
best block is reported (``acc1``, ``best_block``) beside every block's accuracy.

The frozen encoder is the pretraining one (a shared relative position bias), loaded with
init.format="beit" from an official pretraining file (beit_base_patch16_224_pt22k.pth in
the README) or a mim beit_base.py run. AdamW, lr 4e-3 (the README's --lr; the default
--base_lr 1e-3 x 1024 / 256 gives the same), weight decay 1e-4, 100 epochs, cosine to 0
without warm-up, batch 1024 (8 GPUs x 128), RandomResizedCrop + flip only, mean/std 0.5.
The reference decays every probe parameter and steps its cosine per epoch; mim exempts
the biases and steps it per step. Reference: 56.7% top-1 for BEiT-B (best block).

    python -m mim.main --config=experiments/beit_base_linprobe.py --workdir=runs/beit_lin \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=beit_base_patch16_224_pt22k.pth   # or runs/beit_base

Variants:
    :tiny   the tiny encoder of beit_base.py:tiny, 150 steps of batch 256; start it from a
            tiny pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput.
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_beit_common.py")  # shared recipes and tiny settings


def get_config(arg=None):
    return common.linprobe(arg, name="beit_base_linprobe.py")
