"""Shared pieces of the BEiT experiment files (Bao et al. 2022; microsoft/unilm ``beit/``:
README.md, get_started_for_image_classification.md, run_beit_pretraining.py,
run_class_finetuning.py, run_linear_eval.py). Not an experiment itself; each ``beit_*.py``
loads it with ``mim.config.import_sibling``.

Learning rates: the BEiT scripts take ``--lr`` as the absolute rate (no batch scaling,
except run_linear_eval.py's ``--base_lr`` fallback), so these recipes set ``optim.lr``.
Their warm-up starts from 0 (``utils.cosine_scheduler``'s ``start_warmup_value``; the
``--warmup_lr`` argument is never used) and the cosine ends at ``--min_lr``.

Where the scripts' argparse defaults differ from the README recipes (the recipes are the
README commands; the defaults are what a bare command would run):

* run_beit_pretraining.py: ``--lr`` 5e-4 (README 1.5e-3), ``--epochs`` 300 (800 for
  ImageNet-1k, 150 for ImageNet-22k), ``--warmup_epochs`` 5 (10; 22k: ``--warmup_steps
  10000``), ``--clip_grad`` None (3.0), ``--batch_size`` 64 per GPU (128 x 16 GPUs = 2048),
  mean/std 0.5 (ImageNet-1k: ``--imagenet_default_mean_and_std``, ImageNet's);
* run_class_finetuning.py: ``--lr`` 5e-4, ``--layer_decay`` 0.9, ``--weight_decay`` 0.05,
  ``--batch_size`` 64 (README from pt22k_ft22k: 2e-5, 0.85, 1e-8, 64 x 8 GPUs = 512; from
  a pretraining-only model: 4e-3, 0.65, 0.05, 128 x 8 = 1024, 100 epochs, 20 warm-up,
  mixup 0.8, cutmix 1.0); ``--mixup`` / ``--cutmix`` 0;
* run_linear_eval.py: ``--lr`` None, i.e. ``--base_lr`` 1e-3 x batch / 256 (README passes
  ``--lr 4e-3``, which is the same at its 8 x 128 = 1024 images).

``:tiny`` is one small encoder (4-px patches on the bundled 32-px images: an 8x8 grid, 40%
of it masked in blocks) with a patch k-means tokenizer (:mod:`mim.models.patch_kmeans`)
fitted at the run's start on the tokenizer views of its first 2,048 training crops, reading
64-px views (8 px per token); the same encoder for pretraining, fine-tuning and linear probing, so a
tiny pretraining run's workdir plugs into the other two with
``--config.init.checkpoint=<workdir>``.
"""
from mim import config as config_lib
from mim.models import beit, beit_pretrain, tokenizers
from mim.tasks import beit_pretrain as beit_task
from mim.tasks import linprobe as linprobe_task

shared = config_lib.import_sibling(__file__, "_common.py")

INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))      # the scripts' default mean / std
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

TINY_ENCODER = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4)
# 64-px tokenizer views give the 8x8 token grid of the 8x8 patch grid (112 / 8 = 224 / 16).
# A random DALL-E encoder of that size gives a degenerate vocabulary (its most frequent
# id is 63% of the masked tokens): the model would learn the id distribution only.
TINY_TOKENIZER = dict(image_size=64, vocab_size=64, pool=2)
# 25 of 64 patches (75 / 196 of the grid), blocks of at least 4 (16 / 196 of it).
TINY_MASK = dict(num_masking_patches=25, min_num_patches=4)
TINY_CLASSES = 10


def _tiny_data(c):
    shared.tiny_data(c)
    c.data.mean, c.data.std = IMAGENET


# ----------------------------------------------------------------------------------------
# Pretraining (run_beit_pretraining.py; README "Pre-training BEiT-base on ImageNet-1k").


def pretrain(arg=None, name: str = "beit_base.py"):
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "beit_pretrain"
    c.model = beit_pretrain.config()              # ViT-B/16, shared rel. pos. bias, LS 0.1, DP 0.1
    c.tokenizer = tokenizers.config("dalle", image_size=112, dtype="float16")
    c.mask = beit_task.mask_config(num_masking_patches=75, min_num_patches=16)
    c.batch_size = 2048                           # 16 GPUs x --batch_size 128
    c.eval_batch_size = 512
    c.epochs = 800.0
    c.data.image_size = 224
    c.data.mean, c.data.std = IMAGENET            # --imagenet_default_mean_and_std
    c.data.color_jitter = 0.4                     # datasets.py: ColorJitter(0.4, 0.4, 0.4)
    c.data.crop_scale = (0.08, 1.0)
    c.data.interpolation = "bicubic"              # --train_interpolation (the 224-px view)
    c.data.num_workers = 10
    c.optim.name = "adamw"
    c.optim.lr = 1.5e-3
    c.optim.b1, c.optim.b2 = 0.9, 0.999           # --opt_betas 0.9 0.999
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 10.0
    c.optim.min_lr = 1e-5                         # --min_lr default
    c.optim.schedule = "beit_cosine"              # utils.cosine_scheduler, per iteration
    c.optim.clip_grad = 3.0
    c.precision = "amp_bf16"                      # the reference: fp16 autocast + GradScaler
    c.log_every = 50
    c.eval_every = 0
    if v.tiny:
        _tiny_data(c)
        c.model.update(**TINY_ENCODER, vocab_size=TINY_TOKENIZER["vocab_size"], drop_path_rate=0.0)
        c.tokenizer = tokenizers.config("kmeans", **TINY_TOKENIZER)
        c.mask = beit_task.mask_config(**TINY_MASK)
        c.data.crop_scale = (0.35, 1.0)           # 8% crops of 32-px images are 9 px
        shared.tiny_schedule(c, batch_size=64, steps=300, warmup_steps=20, log_every=25, lr=1.5e-3)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)


# ----------------------------------------------------------------------------------------
# Fine-tuning (run_class_finetuning.py): the classify task on the BEiT ViT.

START = ("ft22k", "pretrain")


def finetune(arg=None, name: str = "beit_base_finetune.py"):
    v = shared.parse_arg(arg, name, start="ft22k")
    shared.check_choice(v.start, START, "start", name)
    c = config_lib.base()
    c.task = "classify"
    # beit_base_patch16_224: a table per block (--rel_pos_bias), no absolute position
    # embedding, layer scale 0.1, mean pooling + fc_norm, head x init_scale 0.001.
    c.model = beit.config(num_classes=1000, drop_path_rate=0.1, init_scale=0.001)
    c.init.format = "beit"
    c.data.image_size = 224
    c.data.interpolation = "bicubic"
    c.data.crop_pct = 224 / 256                   # datasets.build_transform below 384 px
    c.data.color_jitter = 0.4                     # timm skips it when RandAugment is on
    c.data.auto_augment = "rand-m9-mstd0.5-inc1"
    c.data.re_prob = 0.25
    c.data.re_mode = "pixel"
    c.data.re_count = 1
    c.data.label_smoothing = 0.1
    c.data.num_workers = 10
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.warmup_epochs = 5.0
    c.optim.min_lr = 1e-6
    c.optim.schedule = "beit_cosine"              # utils.cosine_scheduler, per iteration
    c.precision = "amp_bf16"                      # the reference: DeepSpeed fp16 (Apex O2)
    c.log_every = 50
    if v.start == "ft22k":
        # get_started_for_image_classification.md, BEiT-base from pt22k_ft22k: 8 GPUs x 64.
        c.data.mean, c.data.std = INCEPTION
        c.batch_size = 512
        c.epochs = 30.0
        c.optim.lr = 2e-5
        c.optim.layer_decay = 0.85
        c.optim.weight_decay = 1e-8
    else:
        # The same file, "fully self-supervised pretrained" BEiT-base: 8 GPUs x 128.
        c.data.mean, c.data.std = IMAGENET        # as experiments/beit_base.py pretrains
        c.batch_size = 1024
        c.epochs = 100.0
        c.optim.lr = 4e-3
        c.optim.warmup_epochs = 20.0
        c.optim.layer_decay = 0.65
        c.optim.weight_decay = 0.05
        c.data.mixup = 0.8
        c.data.cutmix = 1.0
    c.eval_batch_size = int(1.5 * c.batch_size)
    if v.tiny:
        _tiny_data(c)
        c.model.update(**TINY_ENCODER, num_classes=TINY_CLASSES)
        c.eval_batch_size = 500
        shared.tiny_schedule(c, batch_size=128, steps=300, warmup_steps=30, lr=2e-3,
                             weight_decay=0.05, layer_decay=0.65)
        # RandAugment, erasing and mixing on 32-px images from a short run only add noise.
        c.data.auto_augment = ""
        c.data.re_prob = 0.0
        c.data.mixup = c.data.cutmix = 0.0
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)


# ----------------------------------------------------------------------------------------
# Linear probing (run_linear_eval.py; README "Linear probe on ImageNet").


def linprobe(arg=None, name: str = "beit_base_linprobe.py"):
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "linprobe"
    # The pretraining encoder as run_linear_eval.py builds it: shared table
    # (--rel_pos_bias), class-token path (use_mean_pooling=False), no drop path.
    c.model = beit.config(num_classes=1000, drop_path_rate=0.0, use_rel_pos_bias=False,
                          use_shared_rel_pos_bias=True, global_pool="token")
    # One LinearClassifier per block on concat(class token, mean of patch tokens), weights
    # normal(0, 0.01) (mim.tasks.linprobe's default head_init_std).
    c.probe = linprobe_task.probe_config("blocks")
    c.init.format = "beit"
    c.batch_size = 1024                           # 8 GPUs x --batch_size_per_gpu 128
    c.eval_batch_size = 1024
    c.epochs = 100.0
    c.data.image_size = 224
    c.data.mean, c.data.std = INCEPTION           # --imagenet_default_mean_and_std False
    # RandomResizedCrop(224)'s default; the reference evaluates after a bicubic Resize(256),
    # mim's eval transform uses the same interpolation as training.
    c.data.interpolation = "bilinear"
    c.data.crop_scale = (0.08, 1.0)
    c.data.crop_pct = 224 / 256                   # Resize(256, bicubic) + CenterCrop(224)
    c.data.num_workers = 10
    c.optim.name = "adamw"
    c.optim.lr = 4e-3
    c.optim.weight_decay = 1e-4                   # on every tensor, biases too (a plain AdamW group)
    c.optim.exempt_1d = False
    c.optim.min_lr = 0.0
    c.optim.schedule = "epoch_cosine"             # CosineAnnealingLR(T_max=epochs, eta_min=0), per epoch
    c.precision = "amp_bf16"                      # --amp_forward True
    c.log_every = 20
    if v.tiny:
        _tiny_data(c)
        c.model.update(**TINY_ENCODER, num_classes=TINY_CLASSES)
        shared.tiny_schedule(c, batch_size=256, steps=150, lr=4e-3)
        c.data.crop_scale = (0.35, 1.0)
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)
