"""Supervised ViT-B/32 (timm ``vit_base_patch32_224``): fine-tune ImageNet-21k weights
on ImageNet-1k.

Recipe of the reference fine-tuning (Dosovitskiy et al. 2021, Sec. 4.1 and App. B.1.1;
the PyTorch port jeonsworld/ViT-pytorch ``train.py``, the one used on Ascend): SGD with
momentum 0.9, no weight decay, global batch 512, lr 0.03 with 500 warm-up steps and
cosine decay to 0 (``WarmupCosineSchedule``, stepped before each optimizer step, so step
``k`` trains at the factor for ``k + 1``: ``optim.schedule="vit_cosine"``), gradient
clipping at global norm 1 once per optimizer step, 224 px, zero-initialised head. Reference: about 80.7% top-1 after 8
epochs on 8 devices.

    python -m mim.main --config=experiments/vit_b32.py --workdir=runs/vit_b32 \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=/weights/vit_base_patch32_224.augreg_in21k.safetensors

Variants:
    :tiny   a 4-block ViT on 32 px images (patch 4) trained from scratch on the bundled
            CIFAR-10 subset on 2 CPU cores in about 10 minutes; reaches about 39% top-1
            (chance 10%), see the README.
    :perf   a short run that prints throughput (images/s per device).
"""

from mim import config as config_lib
from mim.models import vit

shared = config_lib.import_sibling(__file__, "_common.py")


def get_config(arg=None):
    v = shared.parse_arg(arg, "vit_b32.py")
    c = config_lib.base()
    c.task = "classify"
    c.model = vit.config(patch_size=32, embed_dim=768, depth=12, num_heads=12, num_classes=1000,
                         img_size=224, global_pool="token", head_init_std=0.0)
    c.batch_size = 512
    c.eval_batch_size = 512
    c.epochs = 8.0
    c.data.image_size = 224
    c.data.crop_scale = (0.05, 1.0)   # the reference's RandomResizedCrop(224, scale=(0.05, 1))
    c.data.interpolation = "bilinear"
    c.data.mean = (0.5, 0.5, 0.5)     # the 21k weights expect inputs in [-1, 1]
    c.data.std = (0.5, 0.5, 0.5)
    c.data.crop_pct = 1.0             # eval: resize to 224 (the reference's Resize((224, 224)))
    c.data.num_workers = 8
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.lr = 0.03
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 500
    # ViT-pytorch's WarmupCosineSchedule (utils/scheduler.py), stepped before optimizer.step()
    c.optim.schedule = "vit_cosine"
    c.optim.clip_grad = 1.0           # --max_grad_norm, once per optimizer step
    c.precision = "amp_bf16"
    c.log_every = 50
    c.init.format = "timm"

    if v.tiny:
        c.data.path = shared.BUNDLED
        c.model.update(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                       num_classes=10, head_init_std=0.02)
        c.data.image_size = 32
        c.data.crop_scale = (0.35, 1.0)
        c.data.interpolation = "bicubic"
        c.data.num_workers = 1     # the data need a sixth of a core; a second worker only competes
        c.batch_size = 64
        c.eval_batch_size = 250
        c.epochs = 12.0
        c.precision = "fp32"
        # From scratch a small ViT needs AdamW; SGD is the recipe for pretrained weights.
        c.optim.name = "adamw"
        c.optim.lr = 1e-3
        c.optim.weight_decay = 0.05
        c.optim.warmup_steps = 60
        c.log_every = 20
        c.checkpoint_every = 200
        c.init.checkpoint = ""
    if v.perf:
        shared.perf(c, steps=100)
    return shared.finish(c, v)


def get_sweeps(arg=None):
    """``lr``: the recipe's learning rate x 1/3, 1, 3 (a scalar sweep ``--vectorize`` can
    train as one run)."""
    lr = get_config(arg).optim.lr
    return {"lr": [{"optim.lr": lr * f} for f in (1 / 3, 1.0, 3.0)]}
