"""MoBY against an nn.Module re-statement of SwinTransformer/Transformer-SSL's
``models/moby.py`` (written here from the reference; timm's SwinTransformer stands in for
the reference's encoder, which it equals (tests/test_swin.py), and torch.nn.BatchNorm1d
for SyncBatchNorm on one process): one step's loss, keys, momentum-updated weights, queue
and pointer update, BatchNorm statistics and gradients, and the momentum schedule by hand."""
import math

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from mim import tree
from mim.models import moby

timm_swin = pytest.importorskip("timm.models.swin_transformer")

TOL = 1e-5
# MoBYMLP's Linear biases feeding a training-mode BatchNorm (linear_hidden.1: Linear, .2: BN)
BIASES_BEFORE_BN = {"projector.linear_hidden.1.bias", "predictor.linear_hidden.1.bias"}
GRAD_SCALE_BOUND = 4.0   # the tiny model's largest gradient element is about 3


def tiny_cfg(encoder=None, **kw):
    enc = dict(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
               window_size=4, drop_path_rate=0.0)
    enc.update(encoder or {})
    base = dict(encoder=enc, contrast_num_negative=64, mlp_hidden_dim=48, mlp_out_dim=16)
    base.update(kw)
    return moby.config(**base)


# ----------------------------------------------------------------------------------------
# The reference, re-stated.


class RefMLP(tnn.Module):
    """MoBYMLP: Sequential(Identity, [Linear, BatchNorm1d, ReLU] * (L - 1)), Linear."""

    def __init__(self, in_dim, inner_dim, out_dim, num_layers):
        super().__init__()
        hidden = [tnn.Identity()]
        for i in range(num_layers - 1):
            hidden += [tnn.Linear(in_dim if i == 0 else inner_dim, inner_dim),
                       tnn.BatchNorm1d(inner_dim), tnn.ReLU(inplace=True)]
        self.linear_hidden = tnn.Sequential(*hidden)
        self.linear_out = tnn.Linear(in_dim if num_layers == 1 else inner_dim, out_dim)

    def forward(self, x):
        return self.linear_out(self.linear_hidden(x))


class RefMoBY(tnn.Module):
    def __init__(self, cfg, K, k):
        super().__init__()
        e = cfg.encoder

        def enc(rate):
            return timm_swin.SwinTransformer(
                img_size=e.img_size, patch_size=e.patch_size, in_chans=e.in_chans, num_classes=0,
                embed_dim=e.embed_dim, depths=e.depths, num_heads=e.num_heads,
                window_size=e.window_size, mlp_ratio=e.mlp_ratio, qkv_bias=e.qkv_bias,
                drop_path_rate=rate)

        self.encoder = enc(e.drop_path_rate)
        self.encoder_k = enc(cfg.target_drop_path_rate)
        nf = self.encoder.num_features
        h, o = cfg.mlp_hidden_dim, cfg.mlp_out_dim
        self.projector = RefMLP(nf, h, o, cfg.proj_num_layers)
        self.projector_k = RefMLP(nf, h, o, cfg.proj_num_layers)
        self.predictor = RefMLP(o, h, o, cfg.pred_num_layers)
        self.m0, self.T, self.K, self.k = cfg.contrast_momentum, cfg.contrast_temperature, K, k
        self.num_negative = cfg.contrast_num_negative
        self.register_buffer("queue1", torch.randn(o, self.num_negative))
        self.register_buffer("queue2", torch.randn(o, self.num_negative))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        m = 1. - (1. - self.m0) * (np.cos(np.pi * self.k / self.K) + 1) / 2.
        self.k = self.k + 1
        for q, k in zip(self.encoder.parameters(), self.encoder_k.parameters()):
            k.data = k.data * m + q.data * (1. - m)
        for q, k in zip(self.projector.parameters(), self.projector_k.parameters()):
            k.data = k.data * m + q.data * (1. - m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys1, keys2):
        n = keys1.shape[0]
        ptr = int(self.queue_ptr)
        assert self.num_negative % n == 0
        self.queue1[:, ptr:ptr + n] = keys1.T
        self.queue2[:, ptr:ptr + n] = keys2.T
        self.queue_ptr[0] = (ptr + n) % self.num_negative

    def contrastive_loss(self, q, k, queue):
        l_pos = torch.einsum('nc,nc->n', [q, k]).unsqueeze(-1)
        l_neg = torch.einsum('nc,ck->nk', [q, queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    def forward(self, im_1, im_2):
        pred_1 = F.normalize(self.predictor(self.projector(self.encoder(im_1))), dim=1)
        pred_2 = F.normalize(self.predictor(self.projector(self.encoder(im_2))), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            key_1 = F.normalize(self.projector_k(self.encoder_k(im_1)), dim=1)
            key_2 = F.normalize(self.projector_k(self.encoder_k(im_2)), dim=1)
        loss = self.contrastive_loss(pred_1, key_2, self.queue2) \
            + self.contrastive_loss(pred_2, key_1, self.queue1)
        self._dequeue_and_enqueue(key_1, key_2)
        self.keys = (key_1, key_2)
        self.preds = (pred_1.detach(), pred_2.detach())
        return loss


def load_reference(ref, params, state):
    """mim trees -> the re-stated reference (timm's own checkpoint_filter_fn maps the
    official Swin layout to timm's)."""
    for name, src in (("encoder", params["encoder"]), ("encoder_k", state["encoder_k"])):
        m = getattr(ref, name)
        m.load_state_dict(timm_swin.checkpoint_filter_fn(tree.flatten(src), m), strict=True)
    for name, src in (("projector", moby.merge(params["projector"], state["projector"])),
                      ("projector_k", state["projector_k"]),
                      ("predictor", moby.merge(params["predictor"], state["predictor"]))):
        getattr(ref, name).load_state_dict(tree.flatten(src), strict=True)
    for name in ("queue1", "queue2", "queue_ptr"):
        getattr(ref, name).copy_(state[name])


def perturbed_state(cfg, seed=0, ptr=0):
    """An initialised MoBY moved off its start: online and momentum weights differ,
    BatchNorm affine parameters and statistics are not 1/0, the pointer is ``ptr``."""
    gen = torch.Generator().manual_seed(seed)
    params, state = moby.init(gen, cfg)

    def jiggle(t):
        if t.is_floating_point():
            return t + 0.05 * torch.randn(t.shape, generator=gen)
        return t

    params = tree.map(jiggle, params)
    state = dict(state)
    for k in ("encoder_k", "projector_k", "projector", "predictor"):
        state[k] = tree.map(jiggle, state[k])
    state = tree.map_with_name(
        lambda n, t: t.abs() + 0.5 if n.endswith("running_var") else t, state)
    state["queue_ptr"] = torch.tensor([ptr])
    return params, state


def images(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    s = cfg.encoder.img_size
    return torch.randn(n, 3, s, s, generator=g), torch.randn(n, 3, s, s, generator=g)


def assert_close(a, b, what, relative=False, scale=None):
    """max |a - b| < 1e-5; ``relative``: scaled by max(1, max |b|) (gradients, whose
    sums over a batch of views reach ~1); ``scale``: by that number (a gradient against
    the model's largest gradient element: a bias summed over every token of a batch
    carries that sum's rounding)."""
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if scale is None:
        scale = max(1.0, b.abs().max().item()) if relative and b.numel() else 1.0
    assert d < TOL * scale, f"{what}: max |diff| {d} (scale {scale})"


def run_both(cfg, k, K, ptr, batch=4, seed=0, drop_seed=None):
    params, state = perturbed_state(cfg, seed, ptr)
    ref = RefMoBY(cfg, K, k)
    load_reference(ref, params, state)
    ref.train()
    im_1, im_2 = images(cfg, batch, seed + 1)

    moby.momentum_update_(params, state, moby.momentum(torch.tensor(k), K, cfg.contrast_momentum))

    def f(p):
        value, (new_state, aux) = moby.forward(p, state, im_1, im_2, cfg, train=True)
        return value, (new_state, aux)

    if drop_seed is not None:
        torch.manual_seed(drop_seed)
    grads, (loss, (new_state, aux)) = torch.func.grad_and_value(f, has_aux=True)(params)
    if drop_seed is not None:
        torch.manual_seed(drop_seed)
    ref_loss = ref(im_1, im_2)
    ref_loss.backward()
    return dict(params=params, state=state, new_state=new_state, aux=aux, loss=loss, grads=grads,
                ref=ref, ref_loss=ref_loss)


def ref_grads(ref):
    out = {}
    for name in ("projector", "predictor"):
        for k, p in getattr(ref, name).named_parameters():
            out[f"{name}.{k}"] = p.grad
    return out


@pytest.mark.parametrize("k,K,ptr", [(0, 100, 0), (37, 100, 60)])
def test_one_step_matches_reference(k, K, ptr):
    cfg = tiny_cfg()
    r = run_both(cfg, k, K, ptr)
    ref, new_state, aux = r["ref"], r["new_state"], r["aux"]

    assert_close(r["loss"], r["ref_loss"].detach(), "loss")
    assert_close(aux["key_1"], ref.keys[0], "key_1")
    assert_close(aux["key_2"], ref.keys[1], "key_2")
    assert_close(aux["pred_1"], ref.preds[0], "pred_1")

    # momentum-updated weights (the update ran in place on r["state"])
    for name, mine in (("encoder_k", r["state"]["encoder_k"]),):
        sd = timm_swin.checkpoint_filter_fn(tree.flatten(mine), ref.encoder_k)
        for key, v in ref.encoder_k.state_dict().items():
            if key in sd and v.is_floating_point() and "attn_mask" not in key:
                assert_close(sd[key], v, f"{name}.{key}")
    ref_k = ref.projector_k.state_dict()
    for key, v in tree.flatten(new_state["projector_k"]).items():
        assert_close(v, ref_k[key], f"projector_k.{key}")      # weights and BN statistics
    for name in ("projector", "predictor"):
        sd = getattr(ref, name).state_dict()
        for key, v in tree.flatten(new_state[name]).items():
            if key.endswith("num_batches_tracked"):
                assert int(v) == int(sd[key]) == 2, (key, v, sd[key])  # two views, two batches
            else:
                assert_close(v, sd[key], f"{name}.{key}")

    # queues and pointer
    assert_close(new_state["queue1"], ref.queue1, "queue1")
    assert_close(new_state["queue2"], ref.queue2, "queue2")
    assert torch.equal(new_state["queue_ptr"], ref.queue_ptr), (new_state["queue_ptr"], ref.queue_ptr)
    assert int(new_state["queue_ptr"]) == (ptr + 4) % 64
    # the keys went into the columns at the old pointer, the rest is untouched
    cols = torch.arange(ptr, ptr + 4)
    assert torch.equal(new_state["queue1"][:, cols], aux["key_1"].T)
    keep = torch.ones(64, dtype=torch.bool)
    keep[cols] = False
    assert torch.equal(new_state["queue2"][:, keep], r["state"]["queue2"][:, keep])

    # gradients of the online projector and predictor
    g = tree.flatten(r["grads"])
    refs = ref_grads(ref)
    for key, v in refs.items():
        if key in BIASES_BEFORE_BN:
            # a training-mode BatchNorm removes any batch-constant shift: this bias's exact
            # gradient is 0, and both sides hold rounding noise (~1e-5 of the layer's weight
            # gradient) that differs with the kernels; checked as zero, not as equal noise
            w = refs[key[:-len("bias")] + "weight"].abs().max().item()
            assert g[key].abs().max().item() < 1e-4 * max(w, 1.0) > v.abs().max().item(), key
            continue
        assert_close(g[key], v, f"grad {key}", relative=True)
    # and of the encoder, through timm's layout
    enc_g = timm_swin.checkpoint_filter_fn({k[8:]: v for k, v in g.items() if k.startswith("encoder.")},
                                           ref.encoder)
    gscale = max(p.grad.abs().max().item() for p in ref.encoder.parameters())
    for key, p in ref.encoder.named_parameters():
        assert_close(enc_g[key], p.grad, f"grad encoder.{key}", scale=max(1.0, gscale))


def test_online_drop_path_draws_as_the_reference():
    """With the global generator seeded alike, mim's online encoder (drop path 0.2, view 1
    then view 2, as the reference) drops the same samples as timm's DropPath."""
    cfg = tiny_cfg(encoder=dict(drop_path_rate=0.2))
    r = run_both(cfg, 5, 50, 8, batch=8, drop_seed=123)
    assert_close(r["loss"], r["ref_loss"].detach(), "loss with drop path")
    r0 = run_both(cfg, 5, 50, 8, batch=8, drop_seed=124)
    assert (r0["loss"] - r["loss"]).abs() > 1e-4   # the draws matter


def test_two_consecutive_steps_with_sgd():
    """Two reference forwards and SGD steps vs two mim steps: the momentum counter
    advancing by one per step, the queue filling, BN statistics moving."""
    cfg = tiny_cfg()
    params, state = perturbed_state(cfg, 3, 56)
    K = 10
    ref = RefMoBY(cfg, K, 0)
    load_reference(ref, params, state)
    ref.train()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    for p in list(ref.encoder_k.parameters()) + list(ref.projector_k.parameters()):
        p.requires_grad_(False)
    for step in range(2):
        im_1, im_2 = images(cfg, 4, 10 + step)
        opt.zero_grad()
        ref(im_1, im_2).backward()
        opt.step()

        moby.momentum_update_(params, state, moby.momentum(torch.tensor(step), K, 0.99))
        grads, (_, (state, _)) = torch.func.grad_and_value(
            lambda p: (lambda out: (out[0], out[1]))(moby.forward(p, state, im_1, im_2, cfg)),
            has_aux=True)(params)
        with torch.no_grad():
            params = tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert int(state["queue_ptr"]) == 0 == int(ref.queue_ptr)
    assert_close(state["queue1"], ref.queue1, "queue1 after 2 steps")
    ref_k = ref.projector_k.state_dict()
    for key, v in tree.flatten(state["projector_k"]).items():
        assert_close(v, ref_k[key], f"projector_k.{key} after 2 steps")
    # after two SGD steps of lr 0.5 the parameters carry the gradients' relative rounding
    # (TOL of each gradient's scale, as compared above) times the lr, twice
    for key, p in ref.predictor.named_parameters():
        if key in {k.split(".", 1)[1] for k in BIASES_BEFORE_BN}:
            continue
        a = tree.flatten(params["predictor"])[key]
        d = (a.double() - p.detach().double()).abs().max().item()
        assert d < TOL * max(1.0, 2 * 0.5 * GRAD_SCALE_BOUND), (key, d)


def test_momentum_schedule_by_hand():
    # m(k) = 1 - (1 - m0)(cos(pi k / K) + 1) / 2, evaluated by hand for m0 = 0.99, K = 8
    hand = {0: 0.99, 2: 1 - 0.005 * (1 + math.sqrt(0.5)), 4: 0.995,
            6: 1 - 0.005 * (1 - math.sqrt(0.5)), 8: 1.0}
    for k, want in hand.items():
        assert abs(moby.momentum(k, 8, 0.99) - want) < 1e-12
        assert abs(float(moby.momentum(torch.tensor(k), 8, 0.99)) - want) < 1e-12
    assert moby.momentum(torch.tensor(3), 8, 0.99).dtype == torch.float64


def test_momentum_update_is_the_reference_arithmetic():
    """p_k * m + p_q * (1 - m), bitwise, for the encoder and the projector's parameters;
    the momentum projector's BatchNorm statistics are not averaged."""
    cfg = tiny_cfg()
    params, state = perturbed_state(cfg, 1)
    before = tree.map(torch.clone, state)
    m = moby.momentum(torch.tensor(3), 20, 0.99)
    moby.momentum_update_(params, state, m)
    mf = float(m)
    for src, dst in (("encoder", "encoder_k"), ("projector", "projector_k")):
        b = tree.flatten(before[dst])
        for key, q in tree.flatten(params[src]).items():
            want = b[key] * mf + q * (1. - mf)
            assert torch.equal(tree.flatten(state[dst])[key], want), key
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(state["projector_k"]["linear_hidden"]["2"][key],
                           before["projector_k"]["linear_hidden"]["2"][key])


def test_init_layout_and_queues():
    cfg = tiny_cfg()
    params, state = moby.init(torch.Generator().manual_seed(0), cfg)
    ref = RefMoBY(cfg, 1, 0)
    ref_keys = [k for k in ref.state_dict() if not k.startswith(("encoder.", "encoder_k."))]
    mine = list(tree.flatten(params)) + list(tree.flatten(state))
    assert sorted(k for k in mine if not k.startswith(("encoder.", "encoder_k."))) == sorted(ref_keys)
    for k, v in ref.state_dict().items():
        if not k.startswith(("encoder.", "encoder_k.")):
            merged = {**tree.flatten(params), **tree.flatten(state)}
            assert merged[k].shape == v.shape and merged[k].dtype == v.dtype, k
    enc = list(tree.flatten(params["encoder"]))
    assert enc == list(tree.flatten(state["encoder_k"]))
    assert "head.weight" not in enc and "norm.weight" in enc
    for a, b in zip(tree.leaves(params["encoder"]), tree.leaves(state["encoder_k"])):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    for q in ("queue1", "queue2"):
        assert state[q].shape == (16, 64)
        assert torch.allclose(state[q].norm(dim=0), torch.ones(64), atol=1e-6)
    assert not torch.equal(state["queue1"], state["queue2"])
    assert state["queue_ptr"].dtype == torch.long and state["queue_ptr"].shape == (1,)
    # momentum projector: the projector's parameters, fresh statistics
    pk, stats = moby.split_buffers(state["projector_k"])
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(pk), tree.leaves(params["projector"])))
    assert torch.equal(stats["linear_hidden"]["2"]["running_var"], torch.ones(48))
    # torch.nn.Linear's default init bound 1/sqrt(fan_in) on the MLPs
    w = params["projector"]["linear_hidden"]["1"]["weight"]
    assert w.abs().max() <= 1 / math.sqrt(64) and w.abs().max() > 0.9 / math.sqrt(64)


def test_queue_must_hold_whole_batches():
    cfg = tiny_cfg(contrast_num_negative=60)
    params, state = moby.init(torch.Generator().manual_seed(0), cfg)
    im_1, im_2 = images(cfg, 8, 0)
    with pytest.raises(ValueError, match="contrast_num_negative=60 is not divisible"):
        moby.forward(params, state, im_1, im_2, cfg)


def test_eval_mode_leaves_the_state():
    cfg = tiny_cfg()
    params, state = perturbed_state(cfg, 2)
    im_1, im_2 = images(cfg, 4, 0)
    _, (new_state, aux) = moby.forward(params, state, im_1, im_2, cfg, train=False)
    assert all(a is b for a, b in zip(tree.leaves(new_state), tree.leaves(state)))
    ref = RefMoBY(cfg, 10, 0)
    load_reference(ref, params, state)
    ref.eval()
    with torch.no_grad():
        key = F.normalize(ref.projector_k(ref.encoder_k(im_1)), dim=1)
    assert_close(aux["key_1"], key, "eval key_1")


def test_config_errors():
    with pytest.raises(ValueError, match="num_classes must be 0"):
        moby.config(encoder=dict(num_classes=10))
    with pytest.raises(ValueError, match="proj_num_layers"):
        moby.config(proj_num_layers=0)


def test_parameter_facts():
    cfg = tiny_cfg()
    assert moby.no_weight_decay(cfg) == ()
    assert moby.num_layers(cfg) == 4
    assert moby.layer_id("encoder.patch_embed.proj.weight", cfg) == 0
    assert moby.layer_id("encoder.layers.1.blocks.0.attn.qkv.weight", cfg) == 3
    assert moby.layer_id("projector.linear_out.weight", cfg) == 5
