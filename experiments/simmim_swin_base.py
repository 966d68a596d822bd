"""SimMIM pretraining of Swin-B on ImageNet-1k (Xie et al. 2022; microsoft/SimMIM's
configs/swin_base__100ep/simmim_pretrain__swin_base__img192_window6__100ep.yaml).

192 px, window 6, 32-px mask patches at ratio 0.6, one-layer pixel-shuffle head, L1 on
the masked pixels. AdamW (0.9, 0.999), weight decay 0.05 (none on biases, norms,
absolute_pos_embed and mask_token; the relative position bias tables are decayed, as the
reference's build_pretrain_optimizer does: it prefixes the keyword with "encoder."), gradient clipping
at 5.0, global batch 2048, 100 epochs with 10 warm-up epochs then cosine. The reference's
BASE_LR 2e-4 is per 512 images (lr = 2e-4 * 2048 / 512 = 8e-4); mim's base_lr is per 256,
so base_lr = 1e-4 gives the same 8e-4. MIN_LR 1e-5 per 512 -> min_lr = 4e-5 (absolute,
for batch 2048); the warm-up starts at WARMUP_LR 1e-6 per 512 -> optim.warmup_init_lr = 4e-6.
Data: RandomResizedCrop(192, scale (0.67, 1)) + flip.
Reference: fine-tuned at 224 px / window 7 (experiments/simmim_swin_base_finetune.py),
83.5% top-1 (README.md of microsoft/SimMIM; 84.0% after the 800-epoch pretraining).

    python -m mim.main --config=experiments/simmim_swin_base.py --workdir=runs/simmim_swin_base \
        --config.data.path=/data/imagenet

The schedule is the reference's timm ``CosineLRScheduler`` (its cosine counted from step 0),
stepped after each optimizer step in micro-batches as main_simmim.py steps it
(``optim.schedule="timm_cosine"``); gradients are clipped after every micro-batch's
backward (``optim.clip_mode="micro_batch"``).

Variants:
    :epochs=800  the 800-epoch config (BASE_LR 1e-4, WARMUP_LR 5e-7, multistep x0.1 at
            epoch 700: ``optim.schedule="timm_multistep"``); 84.0% after fine-tuning.
    :tiny   a 2-stage Swin (patch 4, window 4, width 64, depths 2-2) with 8-px mask
            patches on the bundled 32-px CIFAR-10 subset, 600 steps on 2 CPU cores; see
            docs/simmim.md.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_simmim_common.py")  # shared recipe and tiny settings


def get_config(arg=None):
    return common.pretrain("swin", arg, name="simmim_swin_base.py")


def get_sweeps(arg=None):
    """``mask_patch_size``: the paper's masked-patch-size ablation (Sec. 4.1.1, ratio 0.6);
    ``:tiny``: the sizes a 32-px image with 4-px model patches allows."""
    v = common.shared.parse_arg(arg, "simmim_swin_base.py", epochs=100)
    sizes = (4, 8, 16) if v.tiny else (4, 8, 16, 32, 64)
    return {"mask_patch_size": [{"model.mask_patch_size": p} for p in sizes]}
