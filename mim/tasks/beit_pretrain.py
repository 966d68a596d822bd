"""BEiT pretraining (Bao et al., 2022, Sec. 2): predict the visual tokens of blockwise-masked
patches (microsoft/unilm ``beit/engine_for_pretraining.py``).

Per image the input pipeline makes two views of one crop (:mod:`mim.data.beit_views`: the
224-px ``image`` and the 112-px ``tokenizer_image``) and draws a block mask
(:func:`mim.data.masks.beit_block_mask`, ``config.mask``), so the step is a deterministic
function of its batch. The loss runs the frozen tokenizer (``frozen_networks``:
``config.tokenizer``, by default the DALL-E dVAE encoder) on ``tokenizer_image`` for the
target ids, the model on ``image`` with the masked patches replaced by ``mask_token``, and
takes the cross-entropy of ``lm_head``'s logits against the ids at the masked positions,
averaged over the masked tokens of each device's micro-batch; the step averages that over
devices and accumulation steps, as DDP averages the reference's per-GPU
``CrossEntropyLoss`` (so a 2048 global batch on 16 devices is the reference's exactly).
``mlm_acc`` is the masked-token accuracy the reference logs. ``evaluate`` reports the same
loss and accuracy over every masked token of the eval split, whose views are centre crops
and whose masks are fixed per image (the eval sampler seeds each image from its index).
"""
from __future__ import annotations

import functools

import ml_collections
import torch
import torch.nn.functional as F

from mim.checkpoints import dalle as dalle_ckpt
from mim.checkpoints import patch_kmeans as kmeans_ckpt
from mim.config import ConfigError
from mim.data import beit_views, masks
from mim.models import beit_pretrain, tokenizers
from mim.tasks import Frozen, ParamRules, View, model_rules

# Weight readers per tokenizer (config.tokenizer.name): path, model config -> tree.
TOKENIZER_LOADERS = {"dalle": dalle_ckpt.load, "kmeans": kmeans_ckpt.load}


MASK_MODES = ("block", "random")


def mask_config(num_masking_patches: int = 75, min_num_patches: int = 16, max_num_patches: int = 0,
                min_aspect: float = 0.3, max_aspect: float = 0.0, mode: str = "block"):
    """``config.mask``: run_beit_pretraining.py's ``--num_mask_patches 75``,
    ``--min_mask_patches_per_block 16``, ``--max_mask_patches_per_block`` (0: no cap beyond
    ``num_masking_patches``) and the generator's aspect range (0: ``1 / min_aspect``).
    ``mode``: "block" (the reference's blockwise masking) or "random" (the paper's Table 4
    ablation: ``num_masking_patches`` patches drawn uniformly; the block fields unused)."""
    return ml_collections.ConfigDict(dict(
        num_masking_patches=num_masking_patches, min_num_patches=min_num_patches,
        max_num_patches=max_num_patches, min_aspect=min_aspect, max_aspect=max_aspect, mode=mode))


def _mask_kwargs(config) -> dict:
    m = config.mask
    return dict(num_masking_patches=m.num_masking_patches, min_num_patches=m.min_num_patches,
                max_num_patches=m.max_num_patches or None, min_aspect=m.min_aspect,
                max_aspect=m.max_aspect or None)


def check(config) -> None:
    """What :func:`mim.config.validate` cannot see inside a BEiT config."""
    m = config.model
    if m.get("name") != "beit_pretrain":
        raise ConfigError(f"config.model.name: beit_pretrain needs a BEiT pretraining model "
                          f"(mim.models.beit_pretrain.config), got {m.get('name')!r}")
    for field in ("tokenizer", "mask"):
        if field not in config:
            raise ConfigError(f"config.{field}: beit_pretrain needs it "
                              f"({'mim.models.tokenizers.config' if field == 'tokenizer' else 'mim.tasks.beit_pretrain.mask_config'})")
    if m.img_size != config.data.image_size:
        raise ConfigError(f"config.model.img_size: {m.img_size} differs from data.image_size="
                          f"{config.data.image_size}")
    try:
        tokenizers.validate(config.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    grid, tok_grid = beit_pretrain.grid_size(m), tokenizers.grid_size(config.tokenizer)
    if grid != tok_grid:
        raise ConfigError(f"config.tokenizer.image_size: {config.tokenizer.image_size} px gives "
                          f"{tok_grid}x{tok_grid} tokens, the model has a {grid}x{grid} patch grid "
                          f"(BEiT: 224 / 16 = 112 / 8 = 14)")
    if tokenizers.vocab_size(config.tokenizer) != m.vocab_size:
        raise ConfigError(f"config.model.vocab_size: {m.vocab_size} differs from the tokenizer's "
                          f"{tokenizers.vocab_size(config.tokenizer)}")
    if config.tokenizer.name not in TOKENIZER_LOADERS:
        raise ConfigError(f"config.tokenizer.name: no weight reader for {config.tokenizer.name!r}")
    mode = config.mask.mode
    if mode not in MASK_MODES:
        raise ConfigError(f"config.mask.mode={mode!r}: must be one of {', '.join(MASK_MODES)}")
    try:
        if mode == "block":
            masks.check_beit_mask(grid, **_mask_kwargs(config))
        else:
            masks.random_patch_mask(torch.Generator(), grid, config.mask.num_masking_patches)
    except ValueError as e:
        raise ConfigError(f"config.mask: {e}") from None


def init(config, gen: torch.Generator):
    check(config)
    return beit_pretrain.init(gen, config.model), {}


def _load_tokenizer(path, gen, tok_cfg):
    if path is None:
        return tokenizers.init(gen, tok_cfg)
    return TOKENIZER_LOADERS[tok_cfg.name](path, tok_cfg.model)


def frozen_networks(config):
    """The visual tokenizer, from ``config.tokenizer.weights`` ("": a random DALL-E encoder
    for tests, or a k-means codebook fitted on the first training crops' tokenizer views)."""
    tok = config.tokenizer
    spec = tokenizers.get(tok)
    fit = {} if spec.fit is None else dict(
        fit=functools.partial(spec.fit, cfg=tok.model), fit_key="tokenizer_image",
        fit_images=spec.fit_images(tok.model))
    return {"tokenizer": Frozen(weights=tok.weights, load=functools.partial(_load_tokenizer, tok_cfg=tok),
                                **fit)}


def frozen_forward(frozen, batch, config):
    """The frozen networks' share of a step (the tokenizer's ids): what ``mim.bench``
    counts apart in its FLOPs split."""
    return tokenizers.token_ids(frozen["tokenizer"], batch["tokenizer_image"], config.tokenizer)


def _forward(params, batch, config, train: bool, frozen):
    """Per masked slot: cross-entropy, correctness, validity and target id, each ``(B, K)``."""
    ids = frozen_forward(frozen, batch, config)
    logits, aux = beit_pretrain.apply(params, batch["image"], batch["mask"], config.model, train=train,
                                      max_masked=config.mask.num_masking_patches)
    labels = ids.gather(1, aux["index"])
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    correct = logits.argmax(-1) == labels
    return ce, correct, aux["valid"], labels


def loss(params, model_state, batch, config, train: bool, frozen):
    ce, correct, valid, _ = _forward(params, batch, config, train, frozen)
    # fp32 weights and cross-entropies (_forward upcasts the logits) whatever the policy:
    # an fp16 count of masked tokens would overflow past 65,504 (874 images at 75 each).
    w = valid.float()
    # check_beit_mask refuses settings that give empty masks; an all-empty micro-batch
    # (probability ~1e-12 per image at 75 of 196) would contribute nothing, not 0/0.
    count = w.sum().clamp(min=1.0)
    value = (ce * w).sum() / count
    metrics = {"mlm_acc": (correct.float() * w).sum() / count,
               "masked_per_image": w.sum(1).mean()}
    return value, (model_state, metrics)


def evaluate(params, model_state, batch, config, frozen):
    ce, correct, valid, labels = _forward(params, batch, config, False, frozen)
    w = valid.double()
    vocab = config.model.vocab_size
    return {"ce_sum": (ce.double() * w).sum(), "correct": (correct.double() * w).sum(),
            "masked_tokens": w.sum(),
            "token_counts": torch.zeros(vocab, dtype=torch.float64, device=ce.device)
            .index_add_(0, labels.flatten(), w.flatten()),
            "count": torch.tensor(batch["image"].shape[0], device=ce.device)}


def summarize(sums):
    """Loss and accuracy over every masked token of the split, and ``majority_acc``: the
    accuracy of always answering the split's most frequent masked token (the floor a
    model that learnt only the token distribution reaches), with ``used_tokens``: how
    many ids of the vocabulary occur among them."""
    n = max(float(sums.get("masked_tokens", 0)), 1.0)
    counts = torch.as_tensor(sums.get("token_counts", [0.0]), dtype=torch.float64)
    return {"loss": sums["ce_sum"] / n, "mlm_acc": sums["correct"] / n,
            "majority_acc": counts.max().item() / n, "used_tokens": int((counts > 0).sum()),
            "count": int(sums.get("count", 0))}


def param_rules(config) -> ParamRules:
    """The model's rules: no weight decay on 1-D tensors, biases, ``pos_embed`` and
    ``cls_token`` (``mask_token`` and the shared table are decayed, as the reference's
    ``get_parameter_groups``); nothing frozen."""
    return model_rules(config.model)


def batch_extras(gen: torch.Generator, config):
    """One ``(G, G)`` block mask per image (``DataAugmentationForBEiT``'s
    ``masked_position_generator``), or uniformly random patches with ``mask.mode="random"``."""
    grid = beit_pretrain.grid_size(config.model)
    if config.mask.mode == "random":
        return {"mask": masks.random_patch_mask(gen, grid, config.mask.num_masking_patches)}
    return {"mask": masks.beit_block_mask(gen, grid, **_mask_kwargs(config))}


def image_keys(config, train: bool = True):
    d, tok = config.data, config.tokenizer
    mean, std = tokenizers.normalization(tok)
    return {"image": View(d.image_size, tuple(d.mean), tuple(d.std)),
            "tokenizer_image": View(tok.image_size, tuple(mean), tuple(std))}


def _views(config, cls, **kw):
    d, tok = config.data, config.tokenizer
    mean, std = tokenizers.normalization(tok)
    return cls(image_size=d.image_size, tokenizer_size=tok.image_size, mean=tuple(d.mean),
               std=tuple(d.std), tokenizer_mean=tuple(mean), tokenizer_std=tuple(std),
               uint8=d.device_normalize, interpolation=d.interpolation,
               tokenizer_interpolation=tok.interpolation, **kw)


def train_transform(config):
    """Colour jitter ``data.color_jitter`` (0.4), flip, one random resized crop
    (``data.crop_scale``, ``data.crop_ratio``) to both views."""
    d = config.data
    return _views(config, beit_views.TwoViewTransform, scale=tuple(d.crop_scale),
                  ratio=tuple(d.crop_ratio), color_jitter=d.color_jitter, hflip=d.hflip)


def eval_transform(config):
    return _views(config, beit_views.CentreTwoViewTransform, crop_pct=config.data.crop_pct)
