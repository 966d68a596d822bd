"""Fine-tuning BEiT-B/16 on ImageNet-1k (microsoft/unilm beit/
get_started_for_image_classification.md, run_class_finetuning.py): the classify task on
the BEiT ViT (model.name="beit": a relative position bias per block, layer scale 0.1,
mean pooling with fc_norm, a new head scaled by init_scale 0.001).

init.format="beit" (mim.checkpoints.beit.load_for_finetune) converts the start as
run_class_finetuning.py does: the shared table of a pretraining checkpoint copied into
every block, index buffers recomputed, tables and pos_embed resized to the grid, a head of
another class count replaced; weights under 'model' or 'module'.

Variants (``:start=``):
    ft22k (default)  from the official self-supervised + ImageNet-22k fine-tuned
            beit_base_patch16_224_pt22k_ft22k.pth: batch 512 (8 GPUs x 64), lr 2e-5,
            5 warm-up epochs, 30 epochs, layer decay 0.85, drop path 0.1, weight decay 1e-8,
            label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
            mean/std 0.5, min lr 1e-6. Reference: 85.2% top-1 (97.6% top-5; README).
    pretrain  from a BEiT pretraining run (experiments/beit_base.py, or the official
            pt22k file): the "fully self-supervised pretrained" recipe, batch 1024 (8 x 128),
            lr 4e-3, 20 warm-up epochs, 100 epochs, layer decay 0.65, weight decay 0.05,
            mixup 0.8, cutmix 1.0, ImageNet mean/std as beit_base.py pretrains.
            Reference: 83.2% top-1 after ImageNet-1k pretraining (paper, Table 1); 83.7%
            from pt22k (README).
    :tiny   the tiny encoder of beit_base.py:tiny, 300 steps; start it from a tiny
            pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput.

    python -m mim.main --config=experiments/beit_base_finetune.py --workdir=runs/beit_ft \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=beit_base_patch16_224_pt22k_ft22k.pth

    python -m mim.main --config=experiments/beit_base_finetune.py:start=pretrain \
        --workdir=runs/beit_base_ft --config.data.path=/data/imagenet \
        --config.init.checkpoint=runs/beit_base
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_beit_common.py")  # shared recipes and tiny settings


def get_config(arg=None):
    return common.finetune(arg, name="beit_base_finetune.py")
