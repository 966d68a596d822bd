"""Linear evaluation of a MoBY Swin-T on ImageNet-1k (SwinTransformer/Transformer-SSL
``moby_linear.py`` with ``configs/moby_swin_tiny.yaml``, 8 GPUs x 64 images): the linprobe
task on the frozen online encoder.

The pretrained online encoder (``encoder.*`` of the MoBY checkpoint, loaded with
``init.format="swin"``, which keeps ``encoder.*`` as the reference's ``load_pretrained``)
is frozen; only the Swin ``head`` (a linear layer on the pooled final-norm features,
trunc-normal 0.02 as the Swin's ``_init_weights``) is trained. SGD with Nesterov momentum
0.9, no weight decay, lr 1.0 per 512 images (``--lr`` default; mim: base_lr 0.5 per 256),
100 epochs, 5 warm-up epochs from 5e-7, cosine to 5e-6 (config.py's WARMUP_LR and MIN_LR,
scaled by batch / 512 as moby_linear.py does), clipping at 5.0 (TRAIN.CLIP_GRAD).
Train: RandomResizedCrop(224) + flip (AUG.SSL_LINEAR_AUG); eval: Resize(256) + centre crop
224, bilinear. Reference: 75.3% top-1 after 300 pretraining epochs, 70.9% after 100
(get_started.md).

As moby_linear.py, the head trains on ``model.train()`` features: the frozen backbone
still runs stochastic depth 0.2 (``--drop-path-rate``; ``probe.encoder_train``), and the
loss is timm's LabelSmoothingCrossEntropy(0.1) (MODEL.LABEL_SMOOTHING with mixup off;
``data.label_smoothing``). Evaluation reads inference-mode features.

    python -m mim.main --config=experiments/moby_swin_tiny_linear.py --workdir=runs/moby_lin \
        --config.data.path=/data/imagenet \
        --config.init.checkpoint=runs/moby_swin_t   # or moby_swin_t_300ep_pretrained.pth

Evaluate the released linear checkpoint (a SwinTransformer with its head):

    python -m mim.main --config=experiments/moby_swin_tiny_linear.py --workdir=runs/eval \
        --config.data.path=/data/imagenet --config.mode=eval \
        --config.init.checkpoint=moby_swin_t_300ep_linear.pth

Variants:
    :tiny   the tiny encoder of moby_swin_tiny.py:tiny on the bundled subset, 300 steps of
            batch 256, and the k-NN accuracy of the frozen encoder at the end; start it from
            a tiny pretraining run with --config.init.checkpoint=<that workdir>.
    :perf   50 steps that print throughput (images/s per device).
"""
from mim import config as config_lib
from mim.models import swin
from mim.tasks import linprobe

shared = config_lib.import_sibling(__file__, "_common.py")
pretrain = config_lib.import_sibling(__file__, "moby_swin_tiny.py")


def get_config(arg=None):
    name = "moby_swin_tiny_linear.py"
    v = shared.parse_arg(arg, name)
    c = config_lib.base()
    c.task = "linprobe"
    dim, depths, heads = swin.SIZES["tiny"]
    c.model = swin.config(img_size=224, embed_dim=dim, depths=depths, num_heads=heads,
                          window_size=7, num_classes=1000, drop_path_rate=0.2, head_init_std=0.02)
    c.probe = linprobe.probe_config("pooled", batch_norm=False, encoder_train=True)
    c.data.label_smoothing = 0.1
    c.init.format = "swin"
    c.batch_size = pretrain.REFERENCE_BATCH
    c.eval_batch_size = 1024
    c.epochs = 100.0
    c.data.image_size = 224
    c.data.interpolation = "bilinear"   # torchvision's default in the reference's transforms
    c.data.crop_scale = (0.08, 1.0)
    c.data.crop_pct = 224 / 256         # Resize(IMG_SIZE + 32) + CenterCrop(IMG_SIZE)
    c.data.num_workers = 8
    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.base_lr = 1.0 * 256 / 512   # --lr 1.0 per 512 images
    c.optim.warmup_init_lr = 5e-7
    c.optim.min_lr = 5e-6
    c.optim.schedule = "timm_cosine"    # lr_scheduler.build_scheduler, step_update after the step
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 5.0
    c.optim.clip_mode = "micro_batch"   # clip_grad_norm_ after every backward (train_one_epoch)
    c.precision = "amp_bf16"
    c.log_every = 10
    if v.tiny:
        shared.tiny_data(c)
        c.model.update(pretrain.TINY_ENCODER, num_classes=pretrain.TINY_CLASSES)
        shared.tiny_schedule(c, batch_size=256, steps=300, warmup_steps=15, base_lr=0.5,
                             warmup_init_lr=0.0, min_lr=0.0)
        c.data.crop_scale = (0.35, 1.0)
        c.knn_every = c.steps        # k-NN of the frozen encoder's features too, at the end
    if v.perf:
        shared.perf(c)
    return shared.finish(c, v)
