"""Fine-tuning an MAE ViT-B/16 encoder on ImageNet-1k (He et al. 2022, Sec. A.1 and
Table 9; the reference's FINETUNE.md): the classify task with global average pooling.

AdamW (0.9, 0.999), base lr 5e-4 scaled by batch/256 (batch 1024: lr 2e-3), layer decay
0.65, weight decay 0.05, drop path 0.1, 100 epochs with 5 warm-up, min lr 1e-6,
RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, label smoothing 0.1, random
erasing 0.25. Reference: 83.6% top-1 (83.664 for the released fine-tuned model; four
seeds 83.46-83.66).

    python -m mim.main --config=experiments/mae_base_finetune.py --workdir=runs/mae_base_ft \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=mae_pretrain_vit_base.pth   # or runs/mae_base (a mim run)

Variants:
    :tiny   the shared tiny encoder on the bundled subset, 300 steps; start it from a
            tiny pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_mae_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.finetune("base", arg, base_lr=5e-4, layer_decay=0.65, drop_path=0.1,
                           epochs=100.0, name="mae_base_finetune.py")
