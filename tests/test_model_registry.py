"""The model registry and each model's parameter facts, against independent statements:
timm's weight-decay groups with the model's ``no_weight_decay()`` (ViT, MAE), and the
reference optimizers' rules re-stated here (BEiT
``optim_factory.py``, SimMIM ``optimizer.py``, MAE ``util/lr_decay.py`` and
``main_pretrain.py``). ``features`` against the model's own ``apply`` pre-logits and
timm's ``forward_intermediates``."""
import functools

import pytest
import torch

from mim import optim
from mim import tree as T
from mim.models import REGISTRY, beit, get, mae, simmim, swin, vit
from mim.peers import MAE

timm_pg = pytest.importorskip("timm.optim._param_groups")
timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_beit = pytest.importorskip("timm.models.beit")
timm_swin = pytest.importorskip("timm.models.swin_transformer")

WD, LD = 0.05, 0.5


def mim_groups(module, cfg, shapes):
    """{name: (lr scale, weight decay)} from the model's facts through mim's optimizer."""
    groups = optim.make_groups(shapes, weight_decay=WD, no_decay_patterns=module.no_weight_decay(cfg),
                               layer_decay=LD, layer_id=lambda n: module.layer_id(n, cfg),
                               num_layers=module.num_layers(cfg))
    return {n: (g.lr_scale, g.weight_decay) for g in groups for n in g.names}


def reference_groups(shapes, layer_of, num_layers, exempt):
    """The reference's get_parameter_groups / get_finetune_param_groups: no decay for 1-D
    tensors, ``.bias`` names and ``exempt(name)``; scale ``LD ** (num_layers + 1 - id)``."""
    return {n: (LD ** (num_layers + 1 - layer_of(n)),
                0.0 if len(s) == 1 or n.endswith(".bias") or exempt(n) else WD)
            for n, s in shapes.items()}


def shapes_of(params):
    return {k: v.shape for k, v in T.flatten(params).items()}


# ------------------------------------------------------------------------------- registry


def test_registry_names_every_model_and_its_facts():
    assert {"vit": vit, "swin": swin, "beit": beit, "mae": mae, "simmim": simmim}.items() <= REGISTRY.items()
    for name, module in REGISTRY.items():
        assert get(name) is module
        for fn in ("init", "apply", "no_weight_decay", "num_layers", "layer_id", "features"):
            assert callable(getattr(module, fn)), (name, fn)
    with pytest.raises(ValueError, match=r"'resnet'.*known models: \['beit', "):
        get("resnet")


# ------------------------------------------------------------------------------- ViT


def tiny_vit(**kw):
    return vit.config(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                num_classes=5), **kw})


def timm_vit_model(cfg):
    return timm_vit.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, num_classes=cfg.num_classes, global_pool=cfg.global_pool,
        qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.norm_eps)).eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_facts_are_timms_no_weight_decay_and_maes_layer_ids(pool):
    """Weight decay: timm's param groups with the model's own no_weight_decay(). Layer ids:
    MAE's lr_decay.param_groups_lrd (get_layer_id_for_vit, num_layers = depth + 1; the
    final norm is the top layer there, while timm's group_matcher puts it with the last
    block)."""
    cfg = tiny_vit(global_pool=pool)
    model = timm_vit_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    want = {}
    for g in timm_pg.param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay()):
        for p in g["params"]:
            n = names[id(p)]
            want[n] = (LD ** (cfg.depth + 1 - mae_layer(n, cfg.depth + 1)), g["weight_decay"])
    shapes = shapes_of(vit.init(torch.Generator(), cfg))
    assert set(shapes) == set(want)
    assert mim_groups(vit, cfg, shapes) == want


# ------------------------------------------------------------------------------- BEiT-style ViT


def beit_layer(name, num_max_layer):
    """BEiT optim_factory.get_num_layer_for_vit (SimMIM's get_vit_layer is the same)."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def test_beit_facts_are_the_references():
    """Skip list = the module's no_weight_decay() {pos_embed, cls_token}; tables decayed."""
    cfg = beit.config(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                      use_abs_pos_emb=True, use_rel_pos_bias=True, use_shared_rel_pos_bias=True)
    shapes = shapes_of(beit.init(torch.Generator(), cfg))
    want = reference_groups(shapes, lambda n: beit_layer(n, cfg.depth + 2), cfg.depth,
                            lambda n: n in {"pos_embed", "cls_token"})
    assert mim_groups(beit, cfg, shapes) == want
    assert want["blocks.0.attn.relative_position_bias_table"][1] == WD


# ------------------------------------------------------------------------------- Swin


def swin_layer(name, num_layers, depths):
    """SimMIM optimizer.get_swin_layer."""
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage, block = int(name.split(".")[1]), name.split(".")[3]
        if block in ("reduction", "norm"):
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(block) + 1
    return num_layers - 1


def tiny_swin(**kw):
    return swin.config(**{**dict(img_size=32, embed_dim=16, depths=(2, 1, 2), num_heads=(1, 2, 4),
                                 window_size=2, num_classes=5), **kw})


def test_swin_facts_are_simmims_finetune_groups():
    """build_finetune_optimizer: skip = no_weight_decay() {absolute_pos_embed}, keywords =
    no_weight_decay_keywords() {relative_position_bias_table}; get_swin_layer ids."""
    cfg = tiny_swin(ape=True)
    shapes = shapes_of(swin.init(torch.Generator(), cfg))
    n = sum(cfg.depths)
    want = reference_groups(shapes, lambda k: swin_layer(k, n + 2, cfg.depths), n,
                            lambda k: k == "absolute_pos_embed" or "relative_position_bias_table" in k)
    assert mim_groups(swin, cfg, shapes) == want
    # timm's SwinTransformer exempts the same tables by its no_weight_decay().
    m = timm_swin.SwinTransformer(img_size=32, embed_dim=16, depths=(2, 1, 2), num_heads=(1, 2, 4),
                                  window_size=2, num_classes=5)
    tables = {k for k in m.no_weight_decay() if k.endswith("relative_position_bias_table")}
    exempt = {k for k, (_, wd) in want.items() if wd == 0}
    assert tables == {k for k in exempt if k.endswith("relative_position_bias_table")}


# ------------------------------------------------------------------------------- MAE

MAE_TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0)


def mae_layer(name, num_layers):
    """MAE util/lr_decay.get_layer_id_for_vit (num_layers = depth + 1)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_mae_facts_are_main_pretrains_and_lr_decays():
    """main_pretrain.py: timm's add_weight_decay with no skip list over the trainable
    parameters of models_mae (the sin-cos tables have requires_grad=False)."""
    cfg = mae.config(**MAE_TINY)
    ref = MAE(**MAE_TINY)
    names = {id(p): n for n, p in ref.named_parameters()}
    want = {}
    for g in timm_pg.param_groups_weight_decay(ref, WD):
        for p in g["params"]:
            want[names[id(p)]] = g["weight_decay"]
    shapes = {k: s for k, s in shapes_of(mae.init(torch.Generator(), cfg)).items() if k not in mae.FROZEN}
    assert set(shapes) == set(want)
    got = mim_groups(mae, cfg, shapes)
    assert {k: wd for k, (_, wd) in got.items()} == want
    assert {k: s for k, (s, _) in got.items()} == {
        k: LD ** (cfg.depth + 1 - mae_layer(k, cfg.depth + 1)) for k in shapes}


# ------------------------------------------------------------------------------- SimMIM


def test_simmim_facts_are_its_encoders_under_encoder():
    """build_pretrain_optimizer skips the encoder's no_weight_decay() names prefixed with
    ``encoder.`` (Swin adds mask_token; the ViT does not) and its keywords, also prefixed:
    'encoder.relative_position_bias_table' is contained in no name, so the tables are
    decayed, as in the reference. The decoder sits above the encoder's layers."""
    cases = {
        "swin": (dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2),
                 lambda k: k in {"encoder.absolute_pos_embed", "encoder.mask_token"}
                 or "encoder.relative_position_bias_table" in k),
        "vit": (dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                lambda k: k in {"encoder.pos_embed", "encoder.cls_token"}),
    }
    for backbone, (enc, exempt) in cases.items():
        cfg = simmim.config(backbone, encoder=enc)
        shapes = shapes_of(simmim.init(torch.Generator(), cfg))
        e = cfg.encoder
        n = sum(e.depths) if backbone == "swin" else e.depth

        def layer_of(k):
            if not k.startswith("encoder."):
                return n + 1
            k = k[len("encoder."):]
            return swin_layer(k, n + 2, e.depths) if backbone == "swin" else beit_layer(k, n + 2)

        assert mim_groups(simmim, cfg, shapes) == reference_groups(shapes, layer_of, n, exempt), backbone


# ------------------------------------------------------------------------------- features


def nlc(t):
    return t.flatten(2).transpose(1, 2) if t.ndim == 4 else t


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_features(pool):
    cfg = tiny_vit(global_pool=pool)
    model = timm_vit_model(cfg)
    params = T.unflatten(dict(model.state_dict()))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = vit.features(params, x, cfg, blocks=True)
    _, aux = vit.apply(params, x, cfg)
    torch.testing.assert_close(out["pooled"], aux["pre_logits"], rtol=0, atol=0)
    with torch.no_grad():
        ref = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
    assert len(out["blocks"]) == cfg.depth
    for got, (spatial, prefix) in zip(out["blocks"], ref):
        torch.testing.assert_close(got, torch.cat([prefix, spatial], 1), rtol=0, atol=1e-5)
    assert "blocks" not in vit.features(params, x, cfg)


def test_beit_features():
    cfg = beit.config(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                      use_rel_pos_bias=True, drop_path_rate=0.0)
    model = timm_beit.Beit(img_size=32, patch_size=8, num_classes=5, global_pool="avg", embed_dim=32,
                           depth=2, num_heads=2, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False,
                           use_rel_pos_bias=True,
                           norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
    params = T.unflatten(sd)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = beit.features(params, x, cfg, blocks=True)
    torch.testing.assert_close(out["pooled"], beit.apply(params, x, cfg)[1]["pre_logits"], rtol=0, atol=0)
    with torch.no_grad():
        ref = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
    for got, (spatial, prefix) in zip(out["blocks"], ref):
        torch.testing.assert_close(got, torch.cat([prefix, spatial], 1), rtol=0, atol=1e-5)


def test_swin_features_are_the_stage_outputs():
    """timm's stage i starts with the official stage i-1's patch merging, so its outputs
    are the official stages' block outputs before merging."""
    cfg = tiny_swin(window_size=4, img_size=64, depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0)
    params = swin.init(torch.Generator().manual_seed(0), cfg)
    m = timm_swin.SwinTransformer(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                                  window_size=4, num_classes=5).eval()
    m.load_state_dict(timm_swin.checkpoint_filter_fn(T.flatten(params), m), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = swin.features(params, x, cfg, blocks=True)
    torch.testing.assert_close(out["pooled"], swin.apply(params, x, cfg)[1]["pre_logits"], rtol=0, atol=0)
    with torch.no_grad():
        ref = m.forward_intermediates(x, norm=False, output_fmt="NCHW", intermediates_only=True)
    assert [tuple(b.shape) for b in out["blocks"]] == [(2, 256, 16), (2, 64, 32), (2, 16, 64)]
    for got, want in zip(out["blocks"], ref):
        torch.testing.assert_close(got, nlc(want), rtol=0, atol=1e-5)


def test_mae_features_are_the_token_pooled_vit_of_its_encoder():
    """The MAE encoder tree is a class-token ViT's (main_linprobe.py's default probe)."""
    cfg = mae.config(**MAE_TINY)
    params = mae.init(torch.Generator().manual_seed(0), cfg)
    vcfg = vit.config(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                      global_pool="token")
    encoder = {k: params[k] for k in ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = mae.features(params, x, cfg, blocks=True)
    _, aux = vit.apply(encoder, x, vcfg, return_blocks=True)
    torch.testing.assert_close(out["pooled"], aux["pre_logits"], rtol=0, atol=1e-6)
    for a, b in zip(out["blocks"], aux["blocks"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_simmim_features_are_its_encoders(backbone):
    enc = (dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
           if backbone == "swin" else dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    cfg = simmim.config(backbone, encoder=enc)
    params = simmim.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = simmim.features(params, x, cfg, blocks=True)
    module = swin if backbone == "swin" else beit
    _, aux = module.apply(params["encoder"], x, cfg.encoder)
    torch.testing.assert_close(out["pooled"], aux["pre_logits"], rtol=0, atol=0)
    assert len(out["blocks"]) == (len(enc["depths"]) if backbone == "swin" else enc["depth"])
