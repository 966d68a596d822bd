"""The bench's BEiT-pretraining, MoBY and Swin linear-probe peers (:mod:`mim.peers_ssl`, timm
modules trained the usual way) compute what mim's steps compute: with mim's trees loaded
into the peer, on the same batch, mask and tokenizer, the peer's loss (and gradients,
queues, momentum weights) equal mim's at fp32 tolerance. So ``mim.bench`` compares the
same work. The peers are independent implementations (timm's ``Beit`` / ``SwinTransformer``
and ``torch.nn`` layers), so a layout or order mistake on either side shows here."""
import importlib.util
import os

import pytest
import torch
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

from conftest import ROOT
from mim import bench, peers, tasks, tree
from mim.models import dalle, moby, tokenizers

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL, ATOL = 1e-5, 1e-5


def tiny(name, batch_size):
    path = os.path.join(ROOT, "experiments", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.batch_size = batch_size
    return c


def jiggle(t, gen, scale=0.05):
    return t + scale * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t


def test_beit_peer_equals_mim():
    c = tiny("beit_base.py", batch_size=4)
    # the DALL-E layout of the :tiny size (the :tiny default is the k-means codebook, below)
    c.tokenizer = tokenizers.config("dalle", image_size=64, n_hid=16, n_blk_per_group=1, vocab_size=512)
    c.model.vocab_size = 512
    task = tasks.get(c.task)
    gen = torch.Generator().manual_seed(0)
    params, _ = task.init(c, gen)
    params = tree.map(lambda t: jiggle(t, gen, 0.02), params)   # zero biases would hide layouts
    batch = bench.synthetic_batch(c, task, c.batch_size, "cpu", seed=1)
    # a random tokenizer's logits are mostly a per-id offset (nearly one id everywhere):
    # centre them on this batch so the targets vary from patch to patch
    tok = tokenizers.init(gen, c.tokenizer)
    logits = dalle.apply(tok, batch["tokenizer_image"], c.tokenizer.model)
    tok["blocks"]["output"]["conv"]["b"] -= logits.mean(dim=(0, 2, 3))
    frozen = {"tokenizer": tok}
    assert 0 < batch["mask"].sum() < batch["mask"].numel()

    peer = peers.build(c)
    peer.load_mim(params, frozen["tokenizer"])
    ids = peer.frozen_forward(batch)
    torch.testing.assert_close(ids, task.frozen_forward(frozen, batch, c), rtol=0, atol=0)
    assert len(ids.unique()) > 10                     # targets that can tell a mistake

    leaves = tree.map(lambda t: t.detach().requires_grad_(True), params)
    want, (_, metrics) = task.loss(leaves, {}, batch, c, True, frozen)
    got = peer(batch)
    print(f"BEiT loss mim {want.item():.6f} peer {got.item():.6f}")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # and the gradients, so the peer's optimizer trains the same thing
    names = ["mask_token", "lm_head.weight", "blocks.0.attn.qkv.weight", "cls_token",
             "rel_pos_bias.relative_position_bias_table", "patch_embed.proj.weight"]
    flat = tree.flatten(leaves)
    mine = torch.autograd.grad(want, [flat[n] for n in names])
    got.backward()
    theirs = dict(peer.named_parameters())
    for n, g in zip(names, mine):
        torch.testing.assert_close(theirs[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)
    # the frozen tokenizer stays out of training
    assert not any(p.requires_grad for p in peer.tokenizer.parameters())
    assert not peer.tokenizer.training and peer.training


def test_kmeans_tokenizer_peer_gives_mims_ids():
    """The :tiny tokenizer: torch's avg_pool2d + cdist + argmin against mim's features."""
    c = tiny("beit_base.py", batch_size=4)
    assert c.tokenizer.name == "kmeans"
    task = tasks.get(c.task)
    batch = bench.synthetic_batch(c, task, c.batch_size, "cpu", seed=1)
    gen = torch.Generator().manual_seed(3)
    tok = {"codebook": torch.rand(c.model.vocab_size, 12, generator=gen) * 2 - 1}
    peer = peers.build(c)
    peer.load_mim(task.init(c, gen)[0], tok)
    ids = peer.frozen_forward(batch)
    torch.testing.assert_close(ids, task.frozen_forward({"tokenizer": tok}, batch, c), rtol=0, atol=0)
    assert len(ids.unique()) > 10


def test_moby_peer_equals_mim():
    c = tiny("moby_swin_tiny.py", batch_size=8)
    c.model.encoder.drop_path_rate = 0.0     # the draws differ; the maths must not
    task = tasks.get(c.task)
    gen = torch.Generator().manual_seed(0)
    params, state = task.init(c, gen)
    params = tree.map(lambda t: jiggle(t, gen), params)
    # the momentum branch off the online one, BatchNorm statistics off 0 / 1, the pointer
    # mid-queue: a wrong pairing, order or slot shows
    for key in ("encoder_k", "projector_k", "projector", "predictor"):
        state[key] = tree.map(lambda t: jiggle(t, gen).abs() if t.is_floating_point() else t, state[key])
    state["queue_ptr"] = torch.tensor([16])
    batch = bench.synthetic_batch(c, task, c.batch_size, "cpu", seed=1)
    step, total = 37, 600

    peer = peers.build(c, total_steps=total)
    peer.load_mim(params, state)
    peer.k = step

    task.update_state_before_step(params, state, torch.tensor(step), total, c)
    peer.before_step()
    got = peer(batch)
    want, (new_state, _) = task.loss(params, state, batch, c, True, {})
    print(f"MoBY loss mim {want.item():.6f} peer {got.item():.6f}")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # the momentum update, the enqueue and the pointer
    want_k = {**{f"encoder_k.swin.{k}": v for k, v in swin_filter(
        tree.flatten(state["encoder_k"]), peer.encoder_k.swin).items()},
        **{f"projector_k.{k}": v for k, v in tree.flatten(state["projector_k"]).items()}}
    theirs = dict(peer.named_parameters())
    target = [n for n in theirs if n.startswith(("encoder_k.", "projector_k."))]
    assert len(target) == len(moby.momentum_pairs(params, state)[1])
    for n in target:
        torch.testing.assert_close(theirs[n], want_k[n], rtol=0, atol=1e-6, msg=n)
    for name in ("queue1", "queue2", "queue_ptr"):
        torch.testing.assert_close(getattr(peer, name), new_state[name], rtol=RTOL, atol=ATOL, msg=name)
    assert int(peer.queue_ptr) == 24
    torch.testing.assert_close(peer.projector.linear_hidden[2].running_mean,
                               new_state["projector"]["linear_hidden"]["2"]["running_mean"],
                               rtol=RTOL, atol=ATOL)


def test_swin_linear_probe_peer_equals_mim():
    c = tiny("moby_swin_tiny_linear.py", batch_size=8)
    c.probe.encoder_train = False            # drop path draws differ; the maths must not
    task = tasks.get(c.task)
    gen = torch.Generator().manual_seed(0)
    params, state = task.init(c, gen)
    params = tree.map(lambda t: jiggle(t, gen), params)
    batch = bench.synthetic_batch(c, task, c.batch_size, "cpu", seed=1)
    peer = peers.build(c)
    peer.swin.load_state_dict(swin_filter(tree.flatten(params), peer.swin), strict=True)
    want, _ = task.loss(params, state, batch, c, True, {})
    got = peer(batch)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert [n for n, p in peer.named_parameters() if p.requires_grad] == ["swin.head.fc.weight",
                                                                         "swin.head.fc.bias"]

