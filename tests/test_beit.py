"""mim.models.beit (BEiT / SimMIM's ViT) against timm's ``Beit``, which has the official
BEiT layout: the same state_dict keys in the same order (timm's ``relative_position_index``
and ``k_bias`` buffers are non-persistent, so no rename table is needed), loaded strictly;
plus the init, the layer ids and the relative position bias resize."""
import functools
import math

import numpy as np
import pytest
import torch

from mim import tree
from mim.checkpoints import swin as ckpt
from mim.models import beit
from mim.nn import relpos

timm_beit = pytest.importorskip("timm.models.beit")

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                drop_path_rate=0.0)
    base.update(kw)
    return beit.config(**base)


def timm_model(cfg):
    return timm_beit.Beit(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, mlp_ratio=cfg.mlp_ratio,
        drop_path_rate=0.0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.norm_eps),
        init_values=cfg.layer_scale_init or None, use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=cfg.use_rel_pos_bias, use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
    ).eval()


def randomise(params, seed=0):
    """Every leaf moved off its init (zero tables, unit norms, equal gammas would hide
    layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    return tree.map(lambda t: t + 0.2 * torch.randn(t.shape, generator=gen), params)


VARIANTS = {
    # SimMIM / BEiT pretraining encoder: shared table, class-token path with the final norm.
    "shared_rpb_token": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token"),
    # SimMIM / BEiT fine-tuning: per-block tables, mean pooling + fc_norm.
    "block_rpb_avg": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, global_pool="avg"),
    "abs_pos_no_layer_scale": dict(use_abs_pos_emb=True, use_rel_pos_bias=False, layer_scale_init=0.0),
    "abs_pos_token_no_qv_bias": dict(use_abs_pos_emb=True, use_rel_pos_bias=False, qkv_bias=False,
                                     global_pool="token"),
    "both_tables_abs_pos": dict(use_abs_pos_emb=True, use_rel_pos_bias=True,
                                use_shared_rel_pos_bias=True, global_pool="token"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keys_and_logits_match_timm_beit(name):
    cfg = small(**VARIANTS[name])
    params = randomise(beit.init(torch.Generator().manual_seed(0), cfg))
    ref = timm_model(cfg)
    assert list(ref.state_dict()) == list(tree.flatten(params))
    ref.load_state_dict(tree.flatten(params), strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, aux = beit.apply(params, x, cfg)
    with torch.no_grad():
        want = ref(x)
        feats = ref.forward_features(x)
    diff = (logits - want).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e} (logit scale {want.abs().max().item():.2f})")
    assert diff < TOL and want.abs().max() > 0.1
    torch.testing.assert_close(aux["tokens"], feats, rtol=0, atol=TOL)
    assert aux["pre_logits"].shape == (3, cfg.embed_dim)


def test_table_rows_and_grid():
    """The index itself is checked against timm's buffers in test_relpos.py."""
    rows = beit.num_relative_distance(4)
    assert rows == 7 * 7 + 3
    assert beit.grid_of_table(rows) == 4
    with pytest.raises(ValueError, match="not"):
        beit.grid_of_table(50)


def test_init_as_the_reference():
    cfg = small(depth=3, embed_dim=64, num_heads=4, init_trunc_at_std=True, layer_scale_init=0.1,
                use_shared_rel_pos_bias=True, use_abs_pos_emb=True)
    a = beit.init(torch.Generator().manual_seed(3), cfg)
    b = beit.init(torch.Generator().manual_seed(3), cfg)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))
    flat = tree.flatten(a)
    for k, v in flat.items():
        if k.endswith(("relative_position_bias_table", "q_bias", "v_bias")) or k.endswith(".bias"):
            assert not v.any(), k
        elif k.endswith(("gamma_1", "gamma_2")):
            assert torch.all(v == 0.1), k
    # Truncated at one std, then attn.proj / mlp.fc2 of block i divided by sqrt(2 (i + 1)).
    for i in range(3):
        s = 0.02 / math.sqrt(2 * (i + 1))
        for k in (f"blocks.{i}.attn.proj.weight", f"blocks.{i}.mlp.fc2.weight"):
            assert flat[k].abs().max() <= s + 1e-9
            assert flat[k].abs().max() > 0.9 * s
        assert flat[f"blocks.{i}.attn.qkv.weight"].abs().max() <= 0.02
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert 0.015 < flat[k].abs().max() <= 0.02, k
    # Head: trunc-normal(0.02) x init_scale; effectively untruncated without the flag.
    assert flat["head.weight"].abs().max() <= 0.02 * 0.001
    loose = tree.flatten(beit.init(torch.Generator().manual_seed(3), small(embed_dim=256, num_heads=4)))
    assert loose["blocks.0.attn.qkv.weight"].abs().max() > 0.05
    assert abs(loose["blocks.0.attn.qkv.weight"].std().item() - 0.02) < 1e-3


def test_mask_token_substitution():
    """BEiT / SimMIM pretraining: masked patch embeddings become mask_token before the
    class token; unmasked ones are untouched."""
    cfg = small(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token", num_classes=0)
    params = randomise(beit.init(torch.Generator().manual_seed(0), cfg))
    params["mask_token"] = torch.randn(1, 1, cfg.embed_dim)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4)
    mask[0, :2] = 1
    mask[1, :, 3] = 1
    t = beit.embed(params, x, cfg, mask)
    plain = beit.embed(params, x, cfg)
    m = mask.flatten(1).bool()
    assert torch.equal(t[:, 1:][m], params["mask_token"][0].expand(int(m.sum()), -1))
    assert torch.equal(t[:, 1:][~m], plain[:, 1:][~m]) and torch.equal(t[:, 0], plain[:, 0])
    out, aux = beit.apply(params, x, cfg, mask=mask)
    assert out.shape == (2, cfg.embed_dim) and aux["tokens"].shape == (2, 17, cfg.embed_dim)
    del params["mask_token"]
    with pytest.raises(ValueError, match="mask_token"):
        beit.apply(params, x, cfg, mask=mask)
    with pytest.raises(ValueError, match="img_size"):
        beit.apply(params, torch.randn(1, 3, 40, 40), cfg)


def test_train_mode_drop_path_and_gradients():
    cfg = small(drop_path_rate=0.5, use_shared_rel_pos_bias=True)
    params = beit.init(torch.Generator().manual_seed(0), cfg)
    # block 1 drops each sample's paths with p=0.5: 16 samples and a fixed seed, so that
    # some paths are kept (with 4 unseeded samples all were dropped in 1 run of 16)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    grads = torch.func.grad(lambda p: beit.apply(p, x, cfg, train=True)[0].square().mean())(params)
    flat = tree.flatten(grads)
    assert flat["rel_pos_bias.relative_position_bias_table"].abs().sum() > 0
    assert flat["blocks.1.attn.relative_position_bias_table"].abs().sum() > 0
    assert flat["blocks.0.attn.q_bias"].abs().sum() > 0
    assert flat["blocks.0.attn.v_bias"].abs().sum() > 0


def test_layer_ids_are_the_references():
    """get_vit_layer (SimMIM optimizer.py) / get_layer_id_for_vit (BEiT optim_factory.py)
    with num_layers = depth + 2."""
    depth = 12
    expected = {
        "cls_token": 0, "mask_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0,
        "rel_pos_bias.relative_position_bias_table": 13,
        "blocks.0.gamma_1": 1, "blocks.0.attn.relative_position_bias_table": 1,
        "blocks.11.mlp.fc2.weight": 12, "norm.weight": 13, "fc_norm.bias": 13, "head.weight": 13,
    }
    cfg12 = beit.config(depth=depth)
    for name, want in expected.items():
        assert beit.layer_id(name, cfg12) == want, name
    cfg = small(use_shared_rel_pos_bias=True, use_abs_pos_emb=True)
    names = tree.flatten(beit.init(torch.Generator(), cfg))
    assert {beit.layer_id(n, cfg) for n in names} == set(range(beit.num_layers(cfg) + 2))


def test_official_buffers_and_export_load_strict_into_timm():
    cfg = small(use_shared_rel_pos_bias=True, use_rel_pos_bias=True)
    params = randomise(beit.init(torch.Generator().manual_seed(0), cfg))
    sd = ckpt.export_official(params, cfg)
    keys = list(sd)
    i = keys.index("blocks.1.attn.relative_position_bias_table")
    assert keys[i + 1] == "blocks.1.attn.relative_position_index"
    assert keys[keys.index("rel_pos_bias.relative_position_bias_table") + 1] == \
        "rel_pos_bias.relative_position_index"
    assert torch.equal(sd["blocks.0.attn.relative_position_index"],
                       timm_beit.gen_relative_position_index((4, 4)))
    back = ckpt.load_official(sd, cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(params)))
    m = timm_model(cfg)
    m.load_state_dict(timm_beit.checkpoint_filter_fn(sd, m), strict=True)


# ----------------------------------------------------------------- table resize at fine-tuning


def test_resize_rel_pos_bias_keeps_class_rows_and_interpolates_the_grid():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(beit.num_relative_distance(6), 3, generator=gen)
    out = beit.resize_rel_pos_bias(table, 7)
    assert out.shape == (beit.num_relative_distance(7), 3)
    assert torch.equal(out[-3:], table[-3:])
    torch.testing.assert_close(out[:-3], relpos.resize(table[:-3], 7), rtol=0, atol=0)
    # Offset (0, 0) sits on a source sample.
    torch.testing.assert_close(out[6 * 13 + 6], table[5 * 11 + 5], rtol=0, atol=1e-6)
    assert beit.resize_rel_pos_bias(table, 6) is table


def test_resize_matches_the_references_scipy_bicubic():
    """remap_pretrained_keys_vit fits interp2d(kind='cubic') on the geometric offsets;
    on a grid that is FITPACK's s=0 spline, RectBivariateSpline."""
    interpolate = pytest.importorskip("scipy.interpolate")
    table = torch.randn(beit.num_relative_distance(4), 2, generator=torch.Generator().manual_seed(1))
    out = beit.resize_rel_pos_bias(table, 6)
    src, dst = 7, 11
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            hi = q
        else:
            lo = q
    dis = np.cumsum([1.0] + [q ** (i + 1) for i in range(src // 2 - 1)])
    x = np.concatenate([-dis[::-1], [0.0], dis])
    u = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    for h in range(2):
        z = table[:-3, h].view(src, src).double().numpy()
        f = interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)
        assert np.abs(out[:-3, h].numpy() - f(u, u).reshape(-1)).max() < 1e-5


def test_fine_tuning_at_a_larger_grid_runs():
    """A per-block model pretrained on a 4x4 grid, its tables resized to 6x6, applies at the
    new size and agrees with timm's Beit carrying the same tables."""
    cfg = small(use_rel_pos_bias=True)
    params = randomise(beit.init(torch.Generator().manual_seed(0), cfg))
    big = small(use_rel_pos_bias=True, img_size=48)
    fresh = beit.init(torch.Generator().manual_seed(1), big)
    out = tree.flatten(ckpt.simmim_to_beit(tree.flatten(params), fresh, big))
    src = tree.flatten(params)
    for k, v in out.items():
        if k.endswith("relative_position_bias_table"):
            torch.testing.assert_close(v, beit.resize_rel_pos_bias(src[k], 6), rtol=0, atol=0)
        else:
            assert torch.equal(v, src[k]), k
    x = torch.randn(2, 3, 48, 48)
    ref = timm_model(big)
    ref.load_state_dict(out, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(beit.apply(tree.unflatten(out), x, big)[0], ref(x), rtol=0, atol=TOL)


def test_config_errors():
    with pytest.raises(ValueError, match="global_pool"):
        small(global_pool="max")
    with pytest.raises(ValueError, match="patch_size"):
        small(img_size=30)
