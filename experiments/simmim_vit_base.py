"""SimMIM pretraining of ViT-B/16 on ImageNet-1k (Xie et al. 2022; microsoft/SimMIM's
configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml).

The encoder is the reference's BEiT-style ViT-B/16 (mim.models.beit): no absolute position
embedding, one relative position bias shared by all blocks (VIT.USE_SHARED_RPB), q/v
biases, layer scale 0.1, drop path 0.1; the tree has the official SimMIM keys, so
microsoft's ViT checkpoints load (mim.checkpoints.swin.load_official) and mim's export.
224 px, 32-px mask patches (2x2 tokens) at ratio 0.6.
AdamW (0.9, 0.999), weight decay 0.05 (none on 1-D tensors, pos_embed and cls_token),
clipping at 5.0, global batch 2048, 800 epochs with 10 warm-up. The reference's BASE_LR
1e-4 is per 512 images (lr = 4e-4 at batch 2048); mim's base_lr is per 256: 5e-5.
Reference: 83.8% top-1 after fine-tuning (experiments/simmim_vit_base_finetune.py).

    python -m mim.main --config=experiments/simmim_vit_base.py --workdir=runs/simmim_vit_base \
        --config.data.path=/data/imagenet

The schedule is SimMIM's ``MultiStepLRScheduler`` (lr_scheduler.py): warm-up from WARMUP_LR
5e-7 per 512 (optim.warmup_init_lr = 2e-6), then x0.1 at epoch 700, stepped after each
optimizer step in micro-batches (``optim.schedule="timm_multistep"``); gradients are
clipped after every micro-batch's backward (``optim.clip_mode="micro_batch"``).

Variants:
    :tiny   a 4-block, 128-d BEiT-style ViT (patch 4) with 8-px mask patches on the bundled 32-px
            CIFAR-10 subset, 600 steps on 2 CPU cores; see docs/simmim.md.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_simmim_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.pretrain("vit", arg, name="simmim_vit_base.py")
