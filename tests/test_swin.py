"""Swin Transformer: mim's functions against timm's ``SwinTransformer``.

mim keeps the official microsoft layout; timm's own ``checkpoint_filter_fn`` (an
independent conversion, which moves ``layers.i.downsample`` to ``layers.{i+1}``) turns the
tree into timm's layout, which then loads with ``strict=True``."""
import os

import pytest
import torch

from mim import tree
from mim.models import swin

timm_swin = pytest.importorskip("timm.models.swin_transformer")

TOL = 1e-5


def tiny_cfg(**kw):
    base = dict(img_size=64, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4,
                num_classes=10, drop_path_rate=0.0)
    base.update(kw)
    return swin.config(**base)


def timm_model(cfg, img_size=None):
    m = timm_swin.SwinTransformer(
        img_size=img_size or cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depths=cfg.depths,
        num_heads=cfg.num_heads, window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, drop_path_rate=0.0)
    return m.eval()


def load_into_timm(params, cfg, img_size=None):
    m = timm_model(cfg, img_size)
    sd = timm_swin.checkpoint_filter_fn(tree.flatten(params), m)
    m.load_state_dict(sd, strict=True)
    return m


def randomise_norms(params, gen):
    """Layer norms and biases start at constants; perturb them so the comparison sees them."""
    def f(name, t):
        if name.endswith("bias") or "norm" in name:
            return t + 0.1 * torch.randn(t.shape, generator=gen)
        return t
    return tree.map_with_name(f, params)


def check_against_timm(cfg, batch=2, size=None):
    gen = torch.Generator().manual_seed(0)
    params = randomise_norms(swin.init(gen, cfg), gen)
    m = load_into_timm(params, cfg, size)
    h, w = size if size else (cfg.img_size, cfg.img_size)
    x = torch.randn(batch, cfg.in_chans, h, w, generator=gen)
    logits, aux = swin.apply(params, x, cfg)
    with torch.no_grad():
        ref = m(x)
        ref_feat = m.forward_features(x)           # (B, H, W, C) after the final norm
    diff = (logits - ref).abs().max().item()
    fdiff = (aux["feature_map"].permute(0, 2, 3, 1) - ref_feat).abs().max().item()
    assert diff < TOL and fdiff < TOL, (diff, fdiff)
    return diff


def test_keys_are_official():
    cfg = tiny_cfg(ape=True)
    names = list(tree.flatten(swin.init(torch.Generator().manual_seed(0), cfg)))
    assert names[:6] == ["absolute_pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                         "patch_embed.norm.weight", "patch_embed.norm.bias",
                         "layers.0.blocks.0.norm1.weight"]
    assert "layers.0.blocks.1.attn.relative_position_bias_table" in names
    assert "layers.0.downsample.reduction.weight" in names
    assert "layers.1.downsample.norm.bias" in names
    assert not any(n.startswith("layers.2.downsample") for n in names)
    assert names[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert not any("relative_position_index" in n or "attn_mask" in n for n in names)


def test_init_is_pure():
    cfg = tiny_cfg()
    a = swin.init(torch.Generator().manual_seed(3), cfg)
    b = swin.init(torch.Generator().manual_seed(3), cfg)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))


def test_logits_match_timm_shifted_windows_and_clipping():
    # 64 px: stages 16x16 (shift 2), 8x8 (shift 2), 4x4 (window clipped to 4, no shift).
    cfg = tiny_cfg()
    assert [g[3] for g in swin.stage_geometry(cfg, 64, 64)] == [2, 2, 0]
    print("max |diff| window 4:", check_against_timm(cfg))


def test_logits_match_timm_window6_192_like():
    # 96 px = 192 px scaled by 1/2: stages 24, 12 (shift 3), then 6 = window (clipped).
    cfg = tiny_cfg(img_size=96, embed_dim=16, window_size=6, num_heads=(1, 2, 4))
    assert swin.stage_geometry(cfg, 96, 96) == [(24, 24, 6, 3), (12, 12, 6, 3), (6, 6, 6, 0)]
    print("max |diff| window 6:", check_against_timm(cfg, batch=1))


def test_logits_match_timm_window7_224_like():
    # 112 px = 224 px scaled by 1/2: stages 28, 14 (shift 3), then 7 = window (clipped).
    cfg = tiny_cfg(img_size=112, embed_dim=16, window_size=7, num_heads=(1, 2, 4))
    assert swin.stage_geometry(cfg, 112, 112) == [(28, 28, 7, 3), (14, 14, 7, 3), (7, 7, 7, 0)]
    print("max |diff| window 7:", check_against_timm(cfg, batch=1))


def test_logits_match_timm_no_qkv_bias_two_stages_headless():
    cfg = tiny_cfg(img_size=32, depths=(2, 2), num_heads=(2, 4), qkv_bias=False, num_classes=0)
    assert "bias" not in swin.init(torch.Generator(), cfg)["layers"]["0"]["blocks"]["0"]["attn"]["qkv"]
    check_against_timm(cfg)


def test_non_square_input():
    cfg = tiny_cfg(depths=(2, 2), num_heads=(2, 4))
    check_against_timm(cfg, batch=1, size=(64, 96))


def test_ape_matches_timm_with_pos_embed_added_after_patch_embed():
    """timm has no absolute position embedding; add it with a hook after timm's patch
    embedding (+norm), where the official ``forward_features`` adds it."""
    cfg = tiny_cfg(ape=True, depths=(2, 2), num_heads=(2, 4))
    gen = torch.Generator().manual_seed(1)
    params = swin.init(gen, cfg)
    ape = params.pop("absolute_pos_embed")
    m = load_into_timm(params, cfg)
    g = cfg.img_size // cfg.patch_size
    m.patch_embed.register_forward_hook(lambda mod, inp, out: out + ape.view(1, g, g, -1))
    params["absolute_pos_embed"] = ape
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        diff = (swin.apply(params, x, cfg)[0] - m(x)).abs().max().item()
    assert diff < TOL


def test_buffers_equal_official_definition():
    """Shifted-window masks against timm's block buffers (the same definitions as the
    official ones); the relative position index is checked in test_relpos.py."""
    cfg = tiny_cfg()
    m = timm_model(cfg)
    blk = m.layers[0].blocks[1]
    assert torch.equal(swin.shift_attn_mask(16, 16, 4, 2), blk.attn_mask)
    blk = m.layers[1].blocks[1]
    assert torch.equal(swin.shift_attn_mask(8, 8, 4, 2), blk.attn_mask)


def test_per_stage_features_and_drop_path():
    cfg = tiny_cfg(drop_path_rate=0.5)
    params = swin.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(2, 3, 64, 64)
    _, aux = swin.apply(params, x, cfg)
    assert [tuple(s.shape) for s in aux["stages"]] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
    assert aux["pre_logits"].shape == (2, 128)
    torch.manual_seed(0)
    a = swin.apply(params, x, cfg, train=True)[0]
    torch.manual_seed(0)
    b = swin.apply(params, x, cfg, train=True)[0]
    c = swin.apply(params, x, cfg, train=False)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert swin.drop_path_rates(cfg) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_gradients_flow_with_torch_func():
    cfg = tiny_cfg(img_size=32, depths=(2, 2), num_heads=(2, 4))
    params = swin.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(2, 3, 32, 32)
    grads = torch.func.grad(lambda p: swin.apply(p, x, cfg)[0].square().mean())(params)
    g = tree.flatten(grads)
    assert g["layers.0.blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    assert all(torch.isfinite(t).all() for t in g.values())


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="window_size=5 does not divide"):
        swin.init(torch.Generator(), tiny_cfg(window_size=5))
    cfg = tiny_cfg()
    params = swin.init(torch.Generator(), cfg)
    with pytest.raises(ValueError, match="patch_size"):
        swin.apply(params, torch.randn(1, 3, 66, 66), cfg)
    cfg5 = tiny_cfg(img_size=80, window_size=5)
    params5 = swin.init(torch.Generator(), cfg5)
    # 40 px: stages 10, 5 (clipped window), then 5x5 cannot be merged.
    with pytest.raises(ValueError, match="even resolution"):
        swin.apply(params5, torch.randn(1, 3, 40, 40), cfg5)
    # 96 px: stage 2 resolution 6 > window 4, so a 6-row table would be needed.
    with pytest.raises(ValueError, match="does not divide"):
        swin.apply(params, torch.randn(1, 3, 96, 96), cfg)


def test_layer_id_as_simmim_get_swin_layer():
    cfg = swin.config(depths=(2, 2, 18, 2))
    assert swin.num_layers(cfg) == 24   # ids 0..25: SimMIM's sum(depths) + 2 groups
    assert swin.layer_id("mask_token", cfg) == 0
    assert swin.layer_id("patch_embed.proj.weight", cfg) == 0
    assert swin.layer_id("layers.0.blocks.0.norm1.weight", cfg) == 1
    assert swin.layer_id("layers.0.blocks.1.mlp.fc1.weight", cfg) == 2
    assert swin.layer_id("layers.0.downsample.reduction.weight", cfg) == 2
    assert swin.layer_id("layers.2.blocks.17.attn.qkv.weight", cfg) == 22
    assert swin.layer_id("layers.2.downsample.norm.bias", cfg) == 22
    assert swin.layer_id("layers.3.blocks.1.norm2.bias", cfg) == 24
    assert swin.layer_id("norm.weight", cfg) == 25
    assert swin.layer_id("head.bias", cfg) == 25
    assert swin.layer_id("absolute_pos_embed", cfg) == 25


def test_sizes_build():
    for name, (dim, depths, heads) in swin.SIZES.items():
        cfg = swin.config(embed_dim=dim, depths=depths, num_heads=heads, img_size=192, window_size=6)
        with torch.device("meta"):
            p = swin.init(torch.Generator(), cfg)
        assert p["norm"]["weight"].shape == (dim * 8,), name


@pytest.mark.skipif(not os.environ.get("MIM_OFFICIAL_SWIN"),
                    reason="set MIM_OFFICIAL_SWIN to microsoft's models/swin_transformer.py")
def test_logits_match_official_microsoft_code():
    """Optional: against the official module itself (file path from the environment),
    loaded strictly with the buffers that ``export_official`` adds."""
    import importlib.util
    from mim.checkpoints import swin as ckpt
    spec = importlib.util.spec_from_file_location("official_swin", os.environ["MIM_OFFICIAL_SWIN"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for cfg in (tiny_cfg(ape=True), tiny_cfg(img_size=96, embed_dim=16, window_size=6, num_heads=(1, 2, 4))):
        gen = torch.Generator().manual_seed(0)
        params = randomise_norms(swin.init(gen, cfg), gen)
        m = mod.SwinTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes,
            embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
            window_size=cfg.window_size, ape=cfg.ape, drop_path_rate=0.0).eval()
        m.load_state_dict(ckpt.export_official(params, cfg), strict=True)
        x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=gen)
        with torch.no_grad():
            diff = (swin.apply(params, x, cfg)[0] - m(x)).abs().max().item()
        print("max |diff| vs official:", diff)
        assert diff < TOL
