"""BEiT pretraining of ViT-B/16 on ImageNet-1k (Bao et al. 2022; microsoft/unilm beit/
README.md "Pre-training BEiT-base on ImageNet-1k", run_beit_pretraining.py).

Masked image modeling with visual tokens: blockwise masks of 75 of the 196 patches
(blocks of at least 16, aspect 0.3-3.3), the masked patch embeddings replaced by a mask
token, and an 8192-way ``lm_head`` predicting the DALL-E dVAE tokens of the 112-px view of
the same crop (colour jitter 0.4, flip, random resized crop 0.08-1; bicubic 224 px for the
model, Lanczos 112 px for the tokenizer). ViT-B/16 with one relative position bias shared
by all blocks, no absolute position embedding, layer scale 0.1, drop path 0.1. AdamW
(0.9, 0.999), lr 1.5e-3 (absolute, global batch 2048 = 16 GPUs x 128), 10 warm-up epochs
from 0, cosine to 1e-5, 800 epochs, weight decay 0.05 (none on 1-D tensors, biases,
pos_embed, cls_token), gradient clipping 3.0, ImageNet mean/std.
Reference: fine-tuned 83.2% top-1 on ImageNet-1k (paper, Table 1; experiments/
beit_base_finetune.py:start=pretrain); linear probe 56.7% (best block,
experiments/beit_base_linprobe.py). The scripts' argparse defaults differ from this
README recipe: see experiments/_beit_common.py. The masked-token accuracy the reference
logs (``mlm_acc``) is reported in the metrics.

The tokenizer weights are OpenAI's (docs/beit.md): convert encoder.pkl once with
``python -m mim.checkpoints.dalle --trust-pickle encoder.pkl dalle_encoder.safetensors``.

    python -m mim.main --config=experiments/beit_base.py --workdir=runs/beit_base \
        --config.data.path=/data/imagenet \
        --config.tokenizer.weights=dalle_encoder.safetensors

Variants:
    :tiny   a 4-block, 128-d ViT (patch 4) on the bundled 32-px CIFAR-10 subset with a
            64-token patch k-means tokenizer fitted at the run's start (64-px views), 300 steps
            on 2 CPU cores (about 2 min); masked-token accuracy 4x the most frequent token's
            share (docs/beit.md, docs/results.md).

Sweeps (``python -m mim.sweep --sweep=NAME``): ``masking``: blockwise (the reference) vs
uniformly random masking of the same number of patches (the paper's Table 4).
    :perf   50 steps that print throughput (images/s per device).
    :tiny,steps=N   cut to N optimizer steps.
"""
from mim.config import import_sibling

common = import_sibling(__file__, "_beit_common.py")  # shared recipes and tiny settings


def get_config(arg=None):
    return common.pretrain(arg, name="beit_base.py")


def get_sweeps(arg=None):
    return {"masking": [{"mask.mode": "block"}, {"mask.mode": "random"}]}
