"""Fine-tuning a SimMIM Swin-B on ImageNet-1k at 224 px, window 7 (microsoft/SimMIM's
configs/swin_base__100ep/simmim_finetune__swin_base__img224_window7__100ep.yaml): the
classify task with a Swin backbone.

The pretraining used window 6 at 192 px; loading interpolates every relative position
bias table 11x11 -> 13x13 (geometric offsets + bicubic spline, SimMIM utils.py) and adds a
fresh head (mim.checkpoints.swin.load_for_finetune, init.format="swin"). AdamW
(0.9, 0.999), weight decay 0.05, layer decay 0.9 (0.8 for the 800-epoch model), drop path
0.1, global batch 2048, 100 epochs with 20 warm-up then cosine, clipping at 5.0. The
reference's BASE_LR 1.25e-3 is per 512 images (lr = 5e-3 at batch 2048); mim's base_lr is
per 256: 6.25e-4. MIN_LR 2.5e-7 per 512 -> min_lr = 1e-6. RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1; eval resize 256 + centre
crop 224. Reference: 83.5% top-1 after 100 pretraining epochs, 84.0% after 800 (README.md
of microsoft/SimMIM; use --config.optim.layer_decay=0.8 for the latter).

    python -m mim.main --config=experiments/simmim_swin_base_finetune.py \
        --workdir=runs/simmim_swin_base_ft --config.data.path=/data/imagenet \
        --config.init.checkpoint=runs/simmim_swin_base   # or simmim_pretrain__swin_base__img192_window6__100ep.pth

Evaluate a fine-tuned model (a mim run, or microsoft's fine-tuned .pth):

    python -m mim.main --config=experiments/simmim_swin_base_finetune.py --workdir=runs/eval \
        --config.data.path=/data/imagenet --config.mode=eval \
        --config.init.checkpoint=simmim_finetune__swin_base__img224_window7__100ep.pth

Variants:
    :tiny   the tiny Swin of simmim_swin_base.py:tiny with window 8 instead of 4 (a window
            change, as 6 -> 7), 300 steps; start it from a tiny pretraining run with
            --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_simmim_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.finetune("swin", arg, name="simmim_swin_base_finetune.py")
