"""Fine-tuning a SimMIM ViT-B/16 on ImageNet-1k (microsoft/SimMIM's
configs/vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml): the classify task
on the reference's BEiT-style ViT-B/16 (model.name="beit"): a relative position bias in
every block (VIT.USE_RPB), no absolute position embedding, q/v biases, layer scale 0.1,
mean pooling with fc_norm.

mim.checkpoints.swin.load_for_finetune (init.format="swin", which reads SimMIM checkpoints
of either backbone, microsoft's files included) drops the mask token and the decoder,
copies the pretrained shared relative position bias into every block (as the reference's
remap_pretrained_keys_vit), resizes the tables if the patch grid differs, replaces
``norm`` by a fresh ``fc_norm`` and uses a fresh head. AdamW (0.9, 0.999), weight decay
0.05 (none on 1-D tensors, pos_embed, cls_token; the tables are decayed, as in the
reference), layer decay 0.65 (layer ids as the reference's get_vit_layer), drop path
0.1, global batch 2048, 100 epochs with 20 warm-up then cosine, clipping at 5.0. The reference's BASE_LR 1.25e-3 is per 512 images (5e-3 at batch 2048);
mim's base_lr is per 256: 6.25e-4. MIN_LR 2.5e-7 per 512 -> min_lr = 1e-6. RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1.
Reference: 83.8% top-1 (README.md of microsoft/SimMIM).

    python -m mim.main --config=experiments/simmim_vit_base_finetune.py \
        --workdir=runs/simmim_vit_base_ft --config.data.path=/data/imagenet \
        --config.init.checkpoint=runs/simmim_vit_base

Variants:
    :tiny   the tiny ViT of simmim_vit_base.py:tiny, 300 steps; start it from a tiny
            pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_simmim_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.finetune("vit", arg, name="simmim_vit_base_finetune.py")
