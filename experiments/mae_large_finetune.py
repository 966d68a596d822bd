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
import importlib.util
import os

# Shared recipe and tiny settings, loaded by path (experiments/ is not a package).
_spec = importlib.util.spec_from_file_location(
    "mim_experiments_mae_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mae_common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
    return common.finetune("large", arg, base_lr=1e-3, layer_decay=0.75, drop_path=0.2,
                           epochs=50.0, name="mae_large_finetune.py")
