"""MoBY pretraining of Swin-T on ImageNet-1k (Xie et al. 2021; SwinTransformer/Transformer-SSL
``configs/moby_swin_tiny.yaml`` on ``config.py``'s defaults, run by ``moby_main.py`` on
8 GPUs x 64 images as get_started.md shows).

Swin-T at 224 px, window 7; online drop path 0.2, target 0; projector and predictor
Linear-BN-ReLU-Linear (4096 hidden, 256 out); momentum 0.99 rising to 1 on a cosine over
the run's steps; temperature 0.2; two queues of 4096 keys. Two BYOL views
(mim.data.ssl_views). AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on every weight
matrix (the reference exempts only 1-D tensors and biases: the relative position bias
tables are decayed), gradient clipping at 5.0, global batch 512, 300 epochs (``:epochs=100``
for the 100-epoch row), 5 warm-up epochs from 5e-7, cosine to 5e-6.

Learning rates: the reference scales BASE_LR 1e-3, WARMUP_LR 5e-7 and MIN_LR 5e-6 by
global batch / 512; mim's ``optim.base_lr`` is per 256 images (5e-4 here, giving 1e-3 at
512) and ``min_lr`` / ``warmup_init_lr`` are absolute (set for batch 512: scale them with
the batch). The schedule is the reference's timm ``CosineLRScheduler`` (``t_initial`` = all
steps, the cosine counted from step 0), stepped after each optimizer step as moby_main.py
steps it (``schedule="timm_cosine"``), and the gradient is clipped after its backward.

Reference: linear evaluation (experiments/moby_swin_tiny_linear.py) 75.3% top-1 after 300
epochs, 70.9% after 100 (get_started.md).

    python -m mim.main --config=experiments/moby_swin_tiny.py --workdir=runs/moby_swin_t \
        --config.data.path=/data/imagenet

Variants:
    :epochs=100  the 100-epoch pretraining (70.9% linear).
    :tiny   a 2-stage Swin (patch 4, window 4, width 64, depths 2-2), 512-wide projector and
            predictor, 1024-key queues, on the bundled 32-px CIFAR-10 subset, 600 steps of
            batch 128 at base lr 4e-3, blur scaled to 32 px, crops of at least 20%, with the
            eval loss and k-NN every 300. See docs/results.md for what it reaches.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim import config as config_lib
from mim.models import moby

shared = config_lib.import_sibling(__file__, "_common.py")

REFERENCE_BATCH = 512          # 8 GPUs x --batch-size 64 (get_started.md)
TINY_ENCODER = dict(img_size=32, patch_size=4, embed_dim=64, depths=(2, 2), num_heads=(2, 4),
                    window_size=4)
TINY_CLASSES = 10


def get_config(arg=None):
    name = "moby_swin_tiny.py"
    v = shared.parse_arg(arg, name, epochs=300)
    shared.check_choice(v.epochs, (100, 300), "epochs", name)
    c = config_lib.base()
    c.task = "moby_pretrain"
    c.model = moby.config()
    c.batch_size = REFERENCE_BATCH
    c.eval_batch_size = 1024
    c.epochs = float(v.epochs)
    c.data.image_size = 224
    c.data.crop_scale = (0.08, 1.0)     # AUG.SSL_AUG_CROP
    c.data.num_workers = 8              # DATA.NUM_WORKERS
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.base_lr = 1e-3 * 256 / 512  # BASE_LR 1e-3 per 512 images
    c.optim.warmup_init_lr = 5e-7       # WARMUP_LR at batch 512
    c.optim.min_lr = 5e-6               # MIN_LR at batch 512
    c.optim.schedule = "timm_cosine"    # lr_scheduler.build_scheduler, step_update after the step
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 5.0
    c.optim.clip_mode = "micro_batch"   # clip_grad_norm_ after every backward (train_one_epoch)
    c.precision = "amp_bf16"            # the reference: apex O1 (fp16 autocast); amp_fp16 for that
    c.log_every = 10                    # PRINT_FREQ
    c.eval_every = 25_020               # 10 epochs of 2502 steps: loss on val with fixed views
    c.knn_every = 25_020                # k-NN (k 20, T 0.07) of the online encoder's features
    if v.tiny:
        shared.tiny_data(c)
        c.model.encoder.update(TINY_ENCODER)
        # Queue of 1,024 keys: a quarter of the 4,000 images, so no image's own key from
        # the previous epoch (31 steps back) is among its negatives.
        c.model.update(mlp_hidden_dim=512, mlp_out_dim=128, contrast_num_negative=1024)
        # BYOL's blur sigma (0.1-2.0 px) is set for 224-px views; at 32 px the same radius
        # blurs away most of the image (SimCLR drops the blur on CIFAR, its Appendix B.9):
        # scaled by 32 / 224. Crops of at least 20% (an 8% crop of a 32-px image is 9 px).
        c.data.blur_sigma = (0.1 * 32 / 224, 2.0 * 32 / 224)
        c.data.crop_scale = (0.2, 1.0)
        # base lr 4e-3 (lr 2e-3 at batch 128): at the reference's 1e-3 the loss barely moves
        # in 600 steps (docs/results.md has the three settings' k-NN at 300 steps).
        shared.tiny_schedule(c, batch_size=128, steps=600, every=300, warmup_steps=30,
                             base_lr=4e-3, min_lr=1e-5, warmup_init_lr=0.0)
        c.knn_every = 300
    if v.perf:
        shared.perf(c)
        c.knn_every = 0
    return shared.finish(c, v)


def get_sweeps(arg=None):
    """``queue``: keys per queue (the reference's 4096, and x1/2, x2; ``:tiny``: around
    its 1,024, the last above the 4,000 images, so each image meets its own older key);
    ``momentum``: the momentum encoder's starting momentum (the reference's 0.99)."""
    v = shared.parse_arg(arg, "moby_swin_tiny.py", epochs=300)
    queues = (256, 1024, 4096) if v.tiny else (2048, 4096, 8192)
    return {"queue": [{"model.contrast_num_negative": q} for q in queues],
            "momentum": [{"model.contrast_momentum": m} for m in (0.9, 0.99, 0.999)]}
