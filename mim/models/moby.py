"""MoBY (Xie et al., 2021, "Self-Supervised Learning with Swin Transformers"): an online
Swin encoder with a projector and a predictor, a momentum encoder and projector, two key
queues and a contrastive loss on two views of each image, as pure functions.

Layout (SwinTransformer/Transformer-SSL ``models/moby.py``): ``params`` hold what the
optimizer trains, ``encoder.*`` (Swin without head), ``projector.*`` and ``predictor.*``
(``MoBYMLP``: ``linear_hidden.{1,2}`` = Linear, BatchNorm1d, then ReLU, and
``linear_out``); ``model_state`` holds the rest of the reference's ``state_dict``:
``encoder_k.*`` and ``projector_k.*`` (the momentum copies, with the target BatchNorm's
statistics), the online BatchNorm statistics (``projector/predictor.linear_hidden.2.
running_mean/running_var/num_batches_tracked``), ``queue1``, ``queue2`` (``(dim, K)``
columns of unit vectors) and ``queue_ptr``. Merging the two flat dicts gives the
reference's keys, less the Swin buffers (``relative_position_index``, ``attn_mask``)
that mim recomputes.

The reference's order of operations in ``MoBY.forward`` is kept: online branch on view 1
then view 2 (each BatchNorm sees one view at a time, so its statistics move twice per
step), then, without gradients, the momentum update (``momentum_update_``, which the task
runs once per optimizer step before the loss) and the keys of view 1 then view 2; the
loss is ``contrastive(pred_1, key_2, queue2) + contrastive(pred_2, key_1, queue1)``
against the queues before this step's keys enter them; then the keys of every rank are
enqueued at the pointer.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import ml_collections
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mim import nn
from mim import tree as T
from mim.models import swin
from mim.models.derived import Derived
from mim.nn import batch_norm as bn
from mim.nn import init as I

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def config(**overrides) -> ml_collections.ConfigDict:
    """configs/moby_swin_tiny.yaml on config.py's defaults: Swin-T encoder (window 7,
    224 px), online drop path 0.2 (``ONLINE_DROP_PATH_RATE``; the encoder's
    ``drop_path_rate``), target drop path 0, momentum 0.99, temperature 0.2, 4096 keys
    per queue, two-layer projector and predictor of width 4096 and output 256
    (``MoBYMLP``'s defaults). BatchNorm momentum 0.1 and eps 1e-5 are torch's defaults,
    which the reference's ``SyncBatchNorm`` layers keep. Nested ``encoder={...}``
    overrides update the Swin config."""
    dim, depths, heads = swin.SIZES["tiny"]
    enc = swin.config(img_size=224, embed_dim=dim, depths=depths, num_heads=heads, window_size=7,
                      num_classes=0, drop_path_rate=0.2)
    c = ml_collections.ConfigDict(dict(
        name="moby",
        encoder=enc,
        target_drop_path_rate=0.0,
        contrast_momentum=0.99,
        contrast_temperature=0.2,
        contrast_num_negative=4096,
        proj_num_layers=2,
        pred_num_layers=2,
        mlp_hidden_dim=4096,
        mlp_out_dim=256,
        bn_momentum=0.1,
        bn_eps=1e-5,
    ))
    enc_overrides = overrides.pop("encoder", {})
    c.update(overrides)
    c.encoder.update({k: tuple(v) if isinstance(v, list) else v for k, v in enc_overrides.items()})
    validate(c)
    return c


def validate(cfg) -> None:
    if cfg.encoder.get("name") != "swin":
        raise ValueError(f"model.encoder.name: MoBY here runs on a Swin encoder, got "
                         f"{cfg.encoder.get('name')!r}")
    if cfg.encoder.num_classes != 0:
        raise ValueError("model.encoder.num_classes must be 0: the MoBY encoder has no head")
    for field in ("proj_num_layers", "pred_num_layers"):
        if not (isinstance(cfg[field], int) and cfg[field] >= 1):
            raise ValueError(f"model.{field}: must be an integer >= 1, got {cfg[field]!r}")
    if not 0.0 <= cfg.contrast_momentum <= 1.0:
        raise ValueError(f"model.contrast_momentum: must be in [0, 1], got {cfg.contrast_momentum}")
    if cfg.contrast_temperature <= 0:
        raise ValueError(f"model.contrast_temperature: must be > 0, got {cfg.contrast_temperature}")
    if not (isinstance(cfg.contrast_num_negative, int) and cfg.contrast_num_negative > 0):
        raise ValueError(f"model.contrast_num_negative: must be a positive integer, got "
                         f"{cfg.contrast_num_negative!r}")


def encoder_config(cfg, target: bool = False):
    """The Swin config of the online encoder, or of the momentum encoder (``target``),
    which differs only in its drop path rate (``TARGET_DROP_PATH_RATE``)."""
    if not target:
        return cfg.encoder
    return Derived(cfg.encoder, {"drop_path_rate": cfg.target_drop_path_rate})


def num_features(cfg) -> int:
    return swin.num_features(cfg.encoder)


# --------------------------------------------------------------------------- MoBYMLP


def _linear_index(i: int) -> str:
    # linear_hidden = Sequential(Identity, [Linear, BatchNorm1d, ReLU] * (num_layers - 1))
    return str(1 + 3 * i)


def _bn_index(i: int) -> str:
    return str(2 + 3 * i)


def _torch_linear(in_dim: int, out_dim: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """torch.nn.Linear's default init (kaiming_uniform(a=sqrt(5)), bias U(+-1/sqrt(in))):
    MoBYMLP does not re-initialise its layers."""
    bound = 1.0 / math.sqrt(in_dim)
    return {"weight": I.lecun_uniform_conv((out_dim, in_dim), gen),
            "bias": torch.empty(out_dim).uniform_(-bound, bound, generator=gen)}


def mlp_init(gen: torch.Generator, in_dim: int, hidden_dim: int, out_dim: int,
             num_layers: int) -> Tuple[dict, dict]:
    """``(params, BatchNorm statistics)`` of a ``MoBYMLP``."""
    params: dict = {}
    stats: dict = {}
    dim = in_dim
    for i in range(num_layers - 1):
        params.setdefault("linear_hidden", {})[_linear_index(i)] = _torch_linear(dim, hidden_dim, gen)
        p, s = bn.init(hidden_dim)
        params["linear_hidden"][_bn_index(i)] = p
        stats.setdefault("linear_hidden", {})[_bn_index(i)] = s
        dim = hidden_dim
    params["linear_out"] = _torch_linear(dim, out_dim, gen)
    return params, stats


def mlp(p: dict, stats: dict, x: torch.Tensor, num_layers: int, cfg, train: bool):
    """``MoBYMLP.forward``: (Linear, SyncBatchNorm, ReLU) x (num_layers - 1), Linear.
    Returns the output and the new statistics (unchanged unless ``train``)."""
    new_stats: dict = {}
    for i in range(num_layers - 1):
        x = nn.linear(p["linear_hidden"][_linear_index(i)], x)
        b = _bn_index(i)
        x, s = bn.batch_norm(p["linear_hidden"][b], stats["linear_hidden"][b], x, train=train,
                             momentum=cfg.bn_momentum, eps=cfg.bn_eps, sync=True)
        new_stats.setdefault("linear_hidden", {})[b] = s
        x = F.relu(x)
    return nn.linear(p["linear_out"], x), new_stats


def split_buffers(t: dict) -> Tuple[dict, dict]:
    """A MoBYMLP subtree holding both BatchNorm parameters and statistics (the momentum
    projector) -> ``(params, statistics)``."""
    flat = T.flatten(t)
    stats = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] in _BN_BUFFERS}
    params = {k: v for k, v in flat.items() if k not in stats}
    return T.unflatten(params), T.unflatten(stats)


def merge(a: dict, b: dict) -> dict:
    """Union of two trees with disjoint leaves, ``a``'s order first within each node as
    the reference's modules (parameters, then buffers)."""
    out = dict(a)
    for k, v in b.items():
        if k in out:
            if not (isinstance(out[k], dict) and isinstance(v, dict)):
                raise ValueError(f"trees overlap at {k!r}")
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- init


def init(gen: torch.Generator, cfg) -> Tuple[dict, dict]:
    """``(params, model_state)``. The momentum encoder and projector start as copies of
    the online ones (``param_k.data.copy_(param_q.data)``); the queues are
    ``F.normalize(randn(dim, K), dim=0)``; the pointer is ``zeros(1, long)``."""
    validate(cfg)
    encoder = swin.init(gen, cfg.encoder)
    projector, proj_stats = mlp_init(gen, num_features(cfg), cfg.mlp_hidden_dim, cfg.mlp_out_dim,
                                     cfg.proj_num_layers)
    # MoBYMLP() for the predictor keeps its in_dim default 256, the projector's output.
    predictor, pred_stats = mlp_init(gen, cfg.mlp_out_dim, cfg.mlp_hidden_dim, cfg.mlp_out_dim,
                                     cfg.pred_num_layers)
    K = cfg.contrast_num_negative
    queue1 = F.normalize(torch.randn(cfg.mlp_out_dim, K, generator=gen), dim=0)
    queue2 = F.normalize(torch.randn(cfg.mlp_out_dim, K, generator=gen), dim=0)
    proj_k_stats = T.map(torch.clone, proj_stats)
    params = {"encoder": encoder, "projector": projector, "predictor": predictor}
    model_state = {
        "queue1": queue1,
        "queue2": queue2,
        "queue_ptr": torch.zeros(1, dtype=torch.long),
        "encoder_k": T.map(torch.clone, encoder),
        "projector": proj_stats,
        "projector_k": merge(T.map(torch.clone, projector), proj_k_stats),
        "predictor": pred_stats,
    }
    return params, model_state


# --------------------------------------------------------------------------- momentum


def momentum(k, total_steps: int, m0: float):
    """``1 - (1 - m0) (cos(pi k / K) + 1) / 2`` (paper Sec. 3.1; ``_momentum_update_key_encoder``):
    ``m0`` at step 0, rising to 1 at ``K``. ``k`` may be an int or a 0-d tensor (the
    train step's counter); the tensor form is float64, as the reference's numpy scalar,
    so the update below rounds exactly as the reference's. ``m0`` may be a 0-d float64
    tensor (each member's own in a vectorized run): the same arithmetic."""
    if isinstance(k, torch.Tensor):
        cos = torch.cos(math.pi * k.to(torch.float64) / total_steps)
    else:
        cos = math.cos(math.pi * k / total_steps)
    return 1.0 - (1.0 - m0) * (cos + 1.0) / 2.0


def momentum_pairs(params: dict, model_state: dict):
    """``(online, target)`` lists in the reference's order: the encoder's parameters,
    then the projector's (its linears and BatchNorm affine parameters; the target's
    BatchNorm statistics are its own, never averaged)."""
    online, target = [], []
    for src, dst in (("encoder", "encoder_k"), ("projector", "projector_k")):
        q = T.flatten(params[src])
        k = T.flatten(model_state[dst])
        missing = [n for n in q if n not in k]
        if missing:
            raise ValueError(f"model_state.{dst} lacks {missing[:5]} of params.{src}")
        online += list(q.values())
        target += [k[n] for n in q]
    return online, target


@torch.no_grad()
def momentum_update_(params: dict, model_state: dict, m) -> None:
    """``p_k = p_k * m + p_q * (1 - m)`` in place, as the reference (two products, then
    their sum: bitwise the reference's arithmetic on the same device)."""
    online, target = momentum_pairs(params, model_state)
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, torch._foreach_mul(online, 1 - m))


# --------------------------------------------------------------------------- forward


def encode(p: dict, x: torch.Tensor, cfg, train: bool, target: bool = False) -> torch.Tensor:
    """Pooled features: the final norm's tokens averaged (``forward_features``)."""
    _, aux = swin.apply(p, x, encoder_config(cfg, target), train=train)
    return aux["pre_logits"]


def apply(params: dict, x: torch.Tensor, cfg, train: bool = False):
    """The online encoder: ``(pooled features, aux)`` as :func:`mim.models.swin.apply`
    without a head. The MoBY loss, which also needs the state, is :func:`forward`."""
    return swin.apply(params["encoder"], x, cfg.encoder, train=train)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """InfoNCE with the positive key in column 0 (``MoBY.contrastive_loss``): logits
    ``[q.k, q.queue] / T``, label 0, mean over the batch. No gradient reaches the queue."""
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.detach()
    # Softmax and batch mean in fp32 whatever the policy (l_neg, a matrix product, leaves
    # autocast in low precision), as every loss reduction in mim.
    logits = torch.cat([l_pos, l_neg], dim=1).float() / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, rank 0's first (``dist_collect``); no gradient."""
    if not _distributed():
        return x
    x = x.detach().contiguous()
    out = x.new_empty((dist.get_world_size() * x.shape[0],) + tuple(x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)
    return out


def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor):
    """``(new queue, new pointer)``: columns ``ptr .. ptr + N`` replaced by ``keys.T``
    and the pointer advanced by ``N`` modulo the queue length (``_dequeue_and_enqueue``).
    ``N`` (the global batch) must divide the queue length, as the reference asserts, so
    a batch never wraps. The pointer stays a tensor: no host synchronisation."""
    n, length = keys.shape[0], queue.shape[1]
    if length % n:
        raise ValueError(f"model.contrast_num_negative={length} is not divisible by the global "
                         f"batch of keys {n}: every step writes the batch at the queue pointer "
                         f"(the reference asserts the same)")
    index = ptr.to(queue.device) + torch.arange(n, device=queue.device)
    return queue.index_copy(1, index, keys.t().to(queue.dtype)), (ptr + n) % length


def forward(params: dict, model_state: dict, im_1: torch.Tensor, im_2: torch.Tensor, cfg,
            train: bool = True):
    """``MoBY.forward`` after its momentum update (run :func:`momentum_update_` first):
    ``(loss, (new model_state, aux))``. ``aux``: ``pred_1``, ``pred_2`` (normalised
    predictions), ``key_1``, ``key_2`` (normalised momentum projections of this rank),
    ``feat_1``, ``feat_2`` (online pooled features). In training the BatchNorm
    statistics move and the keys of all ranks enter the queues; ``train=False`` uses the
    running statistics and leaves the state as it is."""
    pj, pd = params["projector"], params["predictor"]
    proj_stats, pred_stats = model_state["projector"], model_state["predictor"]
    preds, feats = [], []
    for im in (im_1, im_2):
        feat = encode(params["encoder"], im, cfg, train)
        proj, proj_stats = mlp(pj, proj_stats, feat, cfg.proj_num_layers, cfg, train)
        pred, pred_stats = mlp(pd, pred_stats, proj, cfg.pred_num_layers, cfg, train)
        feats.append(feat)
        preds.append(F.normalize(pred.float(), dim=1))

    pk, k_stats = split_buffers(model_state["projector_k"])
    # The momentum branch is state kept in its own precision (fp32 beside O2 parameters).
    k_dtype = model_state["encoder_k"]["patch_embed"]["proj"]["weight"].dtype
    keys = []
    with torch.no_grad():
        for im in (im_1, im_2):
            feat = encode(model_state["encoder_k"], im.to(k_dtype), cfg, train, target=True)
            proj, k_stats = mlp(pk, k_stats, feat, cfg.proj_num_layers, cfg, train)
            keys.append(F.normalize(proj.float(), dim=1))

    t = cfg.contrast_temperature
    loss = (contrastive_loss(preds[0], keys[1], model_state["queue2"], t)
            + contrastive_loss(preds[1], keys[0], model_state["queue1"], t))

    new_state = dict(model_state)
    if train:
        new_state["projector"] = proj_stats
        new_state["predictor"] = pred_stats
        new_state["projector_k"] = merge(pk, k_stats)
        with torch.no_grad():
            ptr = model_state["queue_ptr"]
            new_state["queue1"], new_ptr = enqueue(model_state["queue1"], ptr, all_gather(keys[0]))
            new_state["queue2"], _ = enqueue(model_state["queue2"], ptr, all_gather(keys[1]))
            new_state["queue_ptr"] = new_ptr
    aux = {"pred_1": preds[0], "pred_2": preds[1], "key_1": keys[0], "key_2": keys[1],
           "feat_1": feats[0], "feat_2": feats[1]}
    return loss, (new_state, aux)


# --------------------------------------------------------------------------- parameter facts


def no_weight_decay(cfg) -> Tuple[str, ...]:
    """None beyond the optimizer's own 1-D exemption. The reference's ``build_optimizer``
    asks the ``MoBY`` module, which defines no ``no_weight_decay``; its
    ``set_weight_decay`` exempts 1-D tensors and ``.bias`` names (all 1-D here), so every
    weight matrix, the patch embedding and the relative position bias tables are decayed.
    The momentum branch has ``requires_grad=False`` and is not in the optimizer."""
    return ()


def num_layers(cfg) -> int:
    return swin.num_layers(cfg.encoder)


def layer_id(name: str, cfg) -> int:
    """Encoder parameters take Swin's layer ids (``encoder.`` stripped); the projector and
    predictor sit above the encoder, with the head's id ``num_layers + 1``."""
    if name.startswith("encoder."):
        return swin.layer_id(name[len("encoder."):], cfg.encoder)
    return num_layers(cfg) + 1


def features(params, x, cfg, blocks: bool = False) -> dict:
    """The online encoder's features (``moby_linear.py`` evaluates the online encoder):
    ``pooled`` (B, C) and, with ``blocks``, per-stage tokens (:func:`mim.models.swin.features`)."""
    return swin.features(params["encoder"], x, cfg.encoder, blocks=blocks)
