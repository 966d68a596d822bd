"""Fine-tuning an MAE ViT-L/16 encoder on ImageNet-1k (He et al. 2022; FINETUNE.md's
ViT-Large script): as experiments/mae_base_finetune.py with base lr 1e-3 (batch 1024:
lr 4e-3), layer decay 0.75, drop path 0.2 and 50 epochs. Reference: 85.9% top-1
(85.952 for the released fine-tuned model; four seeds 85.76-85.95).

    python -m mim.main --config=experiments/mae_large_finetune.py --workdir=runs/mae_large_ft \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=mae_pretrain_vit_large.pth

Variants:
    :tiny   the shared tiny encoder on the bundled subset (see experiments/_mae_common.py).
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_mae_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.finetune("large", arg, base_lr=1e-3, layer_decay=0.75, drop_path=0.2,
                           epochs=50.0, name="mae_large_finetune.py")
