"""mim.checkpoints.beit: official BEiT pretraining and fine-tuned checkpoints (state dicts of
the nn.Module re-statement of the reference in tests/beit_reference.py) load into mim trees,
give the reference's outputs, export back to the same keys, shapes and values; fine-tuning
starts are run_class_finetuning.py's conversion (compared with the reference's steps run
on the reference module, scipy's bicubic spline for the table resize)."""
import pytest
import safetensors.torch
import torch

from mim import tree
from mim.checkpoints import beit as ckpt
from mim.checkpoints import io
from mim.data import masks
from mim.models import beit, beit_pretrain

import beit_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def pretrain_cfg(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, vocab_size=256,
                drop_path_rate=0.0)
    base.update(kw)
    return beit_pretrain.config(**base)


def finetune_cfg(img=32, classes=10, **kw):
    base = dict(img_size=img, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=classes,
                drop_path_rate=0.0)
    base.update(kw)
    return beit.config(**base)


def randomised(module, seed=0):
    """The module's state dict with every parameter moved off its init (buffers kept)."""
    gen = torch.Generator().manual_seed(seed)
    names = {n for n, _ in module.named_parameters()}
    return {k: (v + 0.2 * torch.randn(v.shape, generator=gen)) if k in names else v.clone()
            for k, v in module.state_dict().items()}


def official_pretrain(cfg, seed=0):
    m = ref.ForMaskedImageModeling(cfg.img_size, cfg.patch_size, cfg.vocab_size, cfg.embed_dim,
                                   cfg.depth, cfg.num_heads, init_values=cfg.layer_scale_init,
                                   use_abs_pos_emb=cfg.use_abs_pos_emb,
                                   use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias)
    m.load_state_dict(randomised(m, seed))
    return m.eval()


def official_finetuned(cfg, seed=0):
    m = ref.VisionTransformer(cfg.img_size, cfg.patch_size, cfg.num_classes, cfg.embed_dim, cfg.depth,
                              cfg.num_heads, use_abs_pos_emb=cfg.use_abs_pos_emb,
                              use_rel_pos_bias=cfg.use_rel_pos_bias,
                              use_mean_pooling=cfg.global_pool == "avg")
    m.load_state_dict(randomised(m, seed))
    return m.eval()


def same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrapper", ["model", "module", "safetensors"])
def test_pretraining_checkpoint_round_trip(tmp_path, wrapper):
    cfg = pretrain_cfg()
    m = official_pretrain(cfg)
    sd = m.state_dict()
    if wrapper == "safetensors":
        path = tmp_path / "pt.safetensors"
        safetensors.torch.save_file(sd, str(path))
    else:
        path = tmp_path / "pt.pth"
        torch.save({wrapper: sd, "epoch": 799}, path)
    params = ckpt.load_official(str(path), cfg)
    same(ckpt.export_official(params, cfg), sd)
    x = torch.randn(3, 3, 32, 32)
    mask = masks.beit_block_masks(torch.Generator().manual_seed(0), 3, 4, num_masking_patches=6,
                                  min_num_patches=2).flatten(1).bool()
    with torch.no_grad():
        want = m(x, mask)
    got, _ = beit_pretrain.apply(params, x, mask, cfg)
    assert (got - want).abs().max() < TOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_finetuned_checkpoint_round_trip(tmp_path, pool):
    cfg = finetune_cfg(global_pool=pool)
    m = official_finetuned(cfg)
    sd = m.state_dict()
    assert ("fc_norm.weight" in sd) == (pool == "avg") and "blocks.1.attn.relative_position_index" in sd
    torch.save({"model": sd}, tmp_path / "ft.pth")
    params = ckpt.load_official(str(tmp_path / "ft.pth"), cfg)
    same(ckpt.export_official(params, cfg), sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
    got, _ = beit.apply(params, x, cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_full_size_finetuned_layout():
    """beit_base_patch16_224 (per-block tables, mean pooling): the official keys."""
    cfg = beit.config()
    with torch.device("meta"):
        want = ref.VisionTransformer(224, 16, 1000, 768, 12, 12).state_dict()
    ours = ckpt.expected(cfg)
    assert list(ours) == [k for k in want if not k.endswith("relative_position_index")]
    assert all(ours[k].shape == want[k].shape for k in ours)


def test_importer_refuses_what_does_not_fit(tmp_path):
    cfg = pretrain_cfg()
    sd = official_pretrain(cfg).state_dict()
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_official(sd, pretrain_cfg(depth=3))
    with pytest.raises(ValueError, match="shapes differ"):
        ckpt.load_official(sd, pretrain_cfg(vocab_size=128))
    bad = dict(sd)
    bad["rel_pos_bias.relative_position_index"] = bad["rel_pos_bias.relative_position_index"].flip(0)
    with pytest.raises(ValueError, match="relative position index"):
        ckpt.load_official(bad, cfg)
    with pytest.raises(ValueError, match="model.name"):
        ckpt.load_for_finetune({}, tmp_path, pretrain_cfg())


def reference_finetune(cfg, fresh, checkpoint_sd):
    """run_class_finetuning.py on the reference module whose own init is mim's ``fresh``
    tree: conversion, non-strict load; returns its state dict and the keys it reported."""
    m = ref.VisionTransformer(cfg.img_size, cfg.patch_size, cfg.num_classes, cfg.embed_dim, cfg.depth,
                              cfg.num_heads, use_abs_pos_emb=cfg.use_abs_pos_emb,
                              use_rel_pos_bias=cfg.use_rel_pos_bias,
                              use_mean_pooling=cfg.global_pool == "avg")
    m.load_state_dict(ckpt.export_official(fresh, cfg), strict=True)
    converted = ref.finetune_conversion(m, {k: v.clone() for k, v in checkpoint_sd.items()})
    missing, unexpected = ref.load_like_reference(m, converted)
    return m.eval(), missing, unexpected


@pytest.mark.parametrize("case", ["same_grid", "new_grid", "abs_pos_new_grid"])
def test_finetune_from_pretraining_matches_reference(tmp_path, case):
    abs_pos = case == "abs_pos_new_grid"
    pcfg = pretrain_cfg(use_abs_pos_emb=abs_pos, use_shared_rel_pos_bias=not abs_pos)
    sd = official_pretrain(pcfg).state_dict()
    torch.save({"model": sd}, tmp_path / "pt.pth")
    img = 32 if case == "same_grid" else 48
    fcfg = finetune_cfg(img=img, use_abs_pos_emb=abs_pos, use_rel_pos_bias=not abs_pos)
    fresh = beit.init(torch.Generator().manual_seed(9), fcfg)
    got = ckpt.load_for_finetune(fresh, str(tmp_path / "pt.pth"), fcfg)
    m, missing, unexpected = reference_finetune(fcfg, fresh, sd)
    # The reference leaves fc_norm and head at their init and ignores mask_token, lm_head, norm.
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(unexpected) == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    want = {k: v for k, v in m.state_dict().items() if not k.endswith("relative_position_index")}
    flat = tree.flatten(got)
    assert list(flat) == list(want)
    for k in want:
        torch.testing.assert_close(flat[k], want[k], rtol=0, atol=1e-5, msg=k)
    if not abs_pos:
        # Every block starts from the one shared table.
        t0, t1 = flat["blocks.0.attn.relative_position_bias_table"], flat["blocks.1.attn.relative_position_bias_table"]
        assert torch.equal(t0, t1) and t0.shape == ((2 * img // 8 - 1) ** 2 + 3, 4)
    # The new head is trunc_normal_(std=0.02) (timm's absolute [-2, 2] bounds) x init_scale 0.001.
    assert abs(flat["head.weight"].std().item() / (0.02 * 0.001) - 1) < 0.15 and not flat["head.bias"].any()
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        want_logits = m(x)
    torch.testing.assert_close(beit.apply(got, x, fcfg)[0], want_logits, rtol=0, atol=TOL)


def test_finetune_from_finetuned_checkpoints(tmp_path):
    """pt22k_ft22k into another label set: the 21k-way head is dropped for a fresh one and
    everything else (per-block tables, fc_norm) is loaded; the same label set (evaluating an
    ft22kto1k checkpoint) keeps the checkpoint's head."""
    src = finetune_cfg(classes=30)
    sd = official_finetuned(src).state_dict()
    torch.save({"module": sd}, tmp_path / "ft22k.pth")
    for classes in (10, 30):
        cfg = finetune_cfg(classes=classes)
        fresh = beit.init(torch.Generator().manual_seed(1), cfg)
        got = tree.flatten(ckpt.load_for_finetune(fresh, str(tmp_path / "ft22k.pth"), cfg))
        m, missing, _ = reference_finetune(cfg, fresh, sd)
        assert missing == ([] if classes == 30 else ["head.weight", "head.bias"])
        for k, v in m.state_dict().items():
            if not k.endswith("relative_position_index"):
                assert torch.equal(got[k], v), k
        assert torch.equal(got["fc_norm.weight"], sd["fc_norm.weight"])


def test_finetune_from_a_mim_pretraining_run(tmp_path):
    """A mim beit_pretrain checkpoint directory (params.* tensors) starts a fine-tuning run
    as the official file with the same weights does."""
    pcfg = pretrain_cfg()
    sd = official_pretrain(pcfg).state_dict()
    params = ckpt.load_official(sd, pcfg)
    run = io.save(str(tmp_path / "checkpoints"), 10, {"params": params, "step": torch.tensor(10)}, {}, keep=1)
    fcfg = finetune_cfg()
    fresh = beit.init(torch.Generator().manual_seed(2), fcfg)
    a = tree.flatten(ckpt.load_for_finetune(fresh, run, fcfg))
    b = tree.flatten(ckpt.load_for_finetune(fresh, str(tmp_path), fcfg))      # the workdir
    c = tree.flatten(ckpt.to_finetune(sd, fresh, fcfg))
    for k in c:
        assert torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]), k


def test_finetune_refuses_unknown_keys_and_head_counts():
    pcfg = pretrain_cfg()
    sd = dict(official_pretrain(pcfg).state_dict())
    fcfg = finetune_cfg()
    fresh = beit.init(torch.Generator().manual_seed(0), fcfg)
    extra = dict(sd, **{"decoder.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="decoder.weight"):
        ckpt.to_finetune(extra, fresh, fcfg)
    with pytest.raises(ValueError, match="heads"):
        ckpt.to_finetune(sd, beit.init(torch.Generator(), finetune_cfg(img=48, num_heads=2)),
                         finetune_cfg(img=48, num_heads=2))
