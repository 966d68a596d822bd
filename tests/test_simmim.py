"""SimMIM: mim's functions against nn.Module references written here after
microsoft/SimMIM's ``SimMIM`` / ``SwinTransformerForSimMIM`` / ``VisionTransformerForSimMIM``,
built on timm's Swin and BEiT (the reference's ViT is BEiT's, and timm's ``Beit`` has its
layout), plus the checkpoint import/export in the official layouts."""
import functools

import pytest
import torch
import torch.nn.functional as F

from mim import tree
from mim.checkpoints import swin as ckpt
from mim.data import masks
from mim.models import simmim, swin
from mim.nn import relpos

timm_swin = pytest.importorskip("timm.models.swin_transformer")
timm_beit = pytest.importorskip("timm.models.beit")

TOL = 1e-5


def swin_cfg(**kw):
    enc = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    enc.update(kw)
    return simmim.config("swin", encoder=enc)


def vit_cfg():
    return simmim.config("vit", encoder=dict(img_size=64, patch_size=16, embed_dim=32, depth=2,
                                             num_heads=2, drop_path_rate=0.0))


class RefSimMIM(torch.nn.Module):
    """The reference's SimMIM forward on timm modules: mask token after the patch embedding
    (its norm included for Swin), encoder, final norm, feature map, 1x1 conv + pixel shuffle,
    L1 on the upsampled mask."""

    def __init__(self, encoder, kind, mask_token, stride, patch, in_chans, num_features):
        super().__init__()
        self.encoder, self.kind, self.patch, self.in_chans = encoder, kind, patch, in_chans
        # None: the encoder holds the mask token (the official module's layout).
        self.mask_token = torch.nn.Parameter(mask_token.clone()) if mask_token is not None else None
        self.decoder = torch.nn.Sequential(
            torch.nn.Conv2d(num_features, stride ** 2 * 3, kernel_size=1), torch.nn.PixelShuffle(stride))

    def encode(self, x, mask):
        e = self.encoder
        t = e.patch_embed(x)
        if self.kind == "swin":                          # timm: (B, H, W, C)
            w = mask.unsqueeze(-1).type_as(t)
            t = t * (1.0 - w) + self.mask_token.view(1, 1, 1, -1) * w
            t = e.norm(e.layers(t))
            return t.permute(0, 3, 1, 2)
        # VisionTransformerForSimMIM (BEiT-style): mask token, class token, optional
        # absolute embedding, shared relative position bias, blocks, final norm.
        B, L, _ = t.shape
        w = mask.flatten(1).unsqueeze(-1).type_as(t)
        token = self.mask_token if self.mask_token is not None else e.mask_token
        t = t * (1 - w) + token.expand(B, L, -1) * w
        t = torch.cat([e.cls_token.expand(B, -1, -1), t], dim=1)
        if e.pos_embed is not None:
            t = t + e.pos_embed
        shared = e.rel_pos_bias() if e.rel_pos_bias is not None else None
        for blk in e.blocks:
            t = blk(t, shared_rel_pos_bias=shared)
        t = e.norm(t)[:, 1:]
        H = W = int(L ** 0.5)
        return t.permute(0, 2, 1).reshape(B, -1, H, W)

    def forward(self, x, mask):
        z = self.encode(x, mask)
        x_rec = self.decoder(z)
        m = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1).contiguous()
        loss_recon = F.l1_loss(x, x_rec, reduction="none")
        return (loss_recon * m).sum() / (m.sum() + 1e-5) / self.in_chans, x_rec


def timm_encoder(enc):
    """timm's Beit for a SimMIM ViT encoder config (no head, final norm, no fc_norm)."""
    return timm_beit.Beit(
        img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans, num_classes=0,
        global_pool="token", embed_dim=enc.embed_dim, depth=enc.depth, num_heads=enc.num_heads,
        qkv_bias=enc.qkv_bias, mlp_ratio=enc.mlp_ratio, drop_path_rate=0.0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=enc.norm_eps),
        init_values=enc.layer_scale_init or None, use_abs_pos_emb=enc.use_abs_pos_emb,
        use_rel_pos_bias=enc.use_rel_pos_bias, use_shared_rel_pos_bias=enc.use_shared_rel_pos_bias)


def reference_for(params, cfg):
    enc = cfg.encoder
    flat = tree.flatten(params["encoder"])
    mask_token = flat.pop("mask_token")
    if enc.name == "swin":
        m = timm_swin.SwinTransformer(
            img_size=enc.img_size, patch_size=enc.patch_size, num_classes=0, embed_dim=enc.embed_dim,
            depths=enc.depths, num_heads=enc.num_heads, window_size=enc.window_size, drop_path_rate=0.0)
        m.load_state_dict(timm_swin.checkpoint_filter_fn(flat, m), strict=True)
    else:
        m = timm_encoder(enc)
        m.load_state_dict(flat, strict=True)
    ref = RefSimMIM(m, enc.name, mask_token, simmim.encoder_stride(cfg), simmim.patch_size(cfg),
                    enc.in_chans, simmim.num_features(cfg)).eval()
    ref.decoder[0].weight.data.copy_(params["decoder"]["0"]["weight"])
    ref.decoder[0].bias.data.copy_(params["decoder"]["0"]["bias"])
    return ref


def randomise(params, gen):
    """Biases, norms, relative position tables and layer scales off their constant inits."""
    return tree.map_with_name(
        lambda n, t: t + 0.1 * torch.randn(t.shape, generator=gen)
        if (n.endswith(("bias", "relative_position_bias_table")) or "norm" in n or "gamma" in n)
        else t, params)


@pytest.mark.parametrize("make_cfg", [swin_cfg, vit_cfg], ids=["swin", "vit"])
def test_loss_and_reconstruction_match_reference(make_cfg):
    cfg = make_cfg()
    gen = torch.Generator().manual_seed(0)
    params = randomise(simmim.init(gen, cfg), gen)
    ref = reference_for(params, cfg)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = masks.simmim_masks(gen, 2, 64, 32, simmim.patch_size(cfg), 0.6)
    loss, aux = simmim.apply(params, x, cfg, mask=mask)
    with torch.no_grad():
        ref_loss, ref_rec = ref(x, mask)
    ldiff = (loss - ref_loss).abs().item()
    rdiff = (aux["reconstruction"] - ref_rec).abs().max().item()
    print(f"{cfg.encoder.name}: |loss diff| {ldiff:.2e}, max |rec diff| {rdiff:.2e}")
    assert ldiff < TOL and rdiff < TOL
    assert aux["reconstruction"].shape == x.shape


class OfficialSimMIMViT(RefSimMIM):
    """microsoft/SimMIM's ``SimMIM(VisionTransformerForSimMIM)`` as far as its state_dict
    and loss go: the mask token is the encoder's own parameter (after ``cls_token``), the
    ``relative_position_index`` buffers are persistent, the decoder is ``decoder.0``."""

    def __init__(self, cfg):
        enc = cfg.encoder
        e = timm_encoder(enc)
        e.mask_token = torch.nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        torch.nn.init.trunc_normal_(e.mask_token, std=0.02, a=-0.02, b=0.02)
        for mod in e.modules():
            if isinstance(getattr(mod, "relative_position_index", None), torch.Tensor):
                mod.register_buffer("relative_position_index", mod.relative_position_index, persistent=True)
        super().__init__(e, "beit", None, simmim.encoder_stride(cfg), simmim.patch_size(cfg),
                         enc.in_chans, simmim.num_features(cfg))


def test_official_simmim_vit_checkpoint_loads_reproduces_the_loss_and_exports_back(tmp_path):
    """An official-layout SimMIM ViT pretraining state dict (BEiT-style encoder, shared
    relative position bias, q/v biases, gammas) loads strictly into mim, gives the
    reference's loss for the same input and mask, and exports back to the same dict."""
    cfg = vit_cfg()
    gen = torch.Generator().manual_seed(0)
    ref = OfficialSimMIMViT(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    sd = ref.state_dict()
    keys = list(sd)
    assert keys[:4] == ["encoder.cls_token", "encoder.mask_token", "encoder.patch_embed.proj.weight",
                        "encoder.patch_embed.proj.bias"]
    for k in ("encoder.rel_pos_bias.relative_position_bias_table", "encoder.rel_pos_bias.relative_position_index",
              "encoder.blocks.0.gamma_1", "encoder.blocks.0.gamma_2", "encoder.blocks.0.norm1.weight",
              "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.attn.v_bias",
              "encoder.blocks.1.attn.proj.bias", "encoder.blocks.1.mlp.fc2.weight", "encoder.norm.weight",
              "decoder.0.weight", "decoder.0.bias"):
        assert k in sd, k
    assert not any(k.startswith(("encoder.pos_embed", "encoder.fc_norm", "encoder.head")) or
                   "qkv.bias" in k for k in keys)
    # mim's tree is the state dict less the index buffers, in the same order.
    mine = list(tree.flatten(simmim.init(torch.Generator(), cfg)))
    assert mine == [k for k in keys if not k.endswith("relative_position_index")]

    path = tmp_path / "simmim_vit.pth"
    torch.save({"model": sd, "epoch": 799}, path)
    params = ckpt.load_official(path, cfg)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = masks.simmim_masks(gen, 2, 64, 32, simmim.patch_size(cfg), 0.6)
    loss, aux = simmim.apply(params, x, cfg, mask=mask)
    with torch.no_grad():
        ref_loss, ref_rec = ref(x, mask)
    ldiff = (loss - ref_loss).abs().item()
    rdiff = (aux["reconstruction"] - ref_rec).abs().max().item()
    print(f"official ViT: loss {loss.item():.4f}, |loss diff| {ldiff:.2e}, max |rec diff| {rdiff:.2e}")
    assert ldiff < TOL and rdiff < TOL

    out = ckpt.export_official(params, cfg)
    assert list(out) == keys
    assert all(torch.equal(out[k], sd[k]) for k in keys)
    again = OfficialSimMIMViT(cfg)
    again.load_state_dict(out, strict=True)


def test_vit_encoder_is_the_references_beit_style_vit():
    c = simmim.config("vit")
    e = c.encoder
    assert e.name == "beit" and (e.img_size, e.patch_size, e.embed_dim, e.depth) == (224, 16, 768, 12)
    assert (e.use_abs_pos_emb, e.use_rel_pos_bias, e.use_shared_rel_pos_bias) == (False, False, True)
    assert (e.qkv_bias, e.layer_scale_init, e.global_pool, e.init_trunc_at_std) == (True, 0.1, "token", True)
    params = tree.flatten(simmim.init(torch.Generator().manual_seed(0), vit_cfg()))
    # VisionTransformerForSimMIM truncates every init at one standard deviation.
    assert params["encoder.mask_token"].abs().max() <= 0.02
    assert params["encoder.blocks.0.attn.qkv.weight"].abs().max() <= 0.02
    with pytest.raises(ValueError, match="global_pool"):
        simmim.config("vit", encoder=dict(global_pool="avg"))


def test_tree_keys_are_the_reference_module_keys():
    names = list(tree.flatten(simmim.init(torch.Generator(), swin_cfg())))
    assert names[-3:] == ["encoder.mask_token", "decoder.0.weight", "decoder.0.bias"]
    assert names[0] == "encoder.patch_embed.proj.weight"
    assert not any(n.startswith("encoder.head") for n in names)
    assert simmim.init(torch.Generator(), swin_cfg())["decoder"]["0"]["weight"].shape == (8 * 8 * 3, 32, 1, 1)


def test_loss_normalisation_by_hand():
    """Zero decoder: reconstruction is 0, so the loss is the mean |x| over masked pixels,
    averaged over channels (pixel count from the single-channel mask)."""
    cfg = swin_cfg()
    params = simmim.init(torch.Generator().manual_seed(0), cfg)
    params["decoder"]["0"] = {k: torch.zeros_like(v) for k, v in params["decoder"]["0"].items()}
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[0, :8, :8] = 1        # one 32-px block in image 0
    mask[1, 8:, :] = 1         # bottom half of image 1
    loss, _ = simmim.apply(params, x, cfg, mask=mask)
    masked_abs = x[0, :, :32, :32].abs().sum() + x[1, :, 32:, :].abs().sum()
    pixels = 32 * 32 + 32 * 64
    expected = masked_abs / (pixels + 1e-5) / 3
    assert abs(loss.item() - expected.item()) < 1e-6


def test_mask_changes_only_masked_tokens_and_grad_flows():
    cfg = swin_cfg()
    params = simmim.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(1, 3, 64, 64)
    mask = masks.simmim_masks(torch.Generator().manual_seed(1), 1, 64, 32, 4, 0.5)
    grads = torch.func.grad(lambda p: simmim.apply(p, x, cfg, mask=mask)[0])(params)
    assert grads["encoder"]["mask_token"].abs().sum() > 0
    assert grads["decoder"]["0"]["weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="needs a mask"):
        simmim.apply(params, x, cfg)
    with pytest.raises(ValueError, match="patch grid"):
        simmim.apply(params, x, cfg, mask=mask[:, :8])


def test_default_configs():
    c = simmim.config("swin")
    assert (c.encoder.img_size, c.encoder.window_size, simmim.encoder_stride(c)) == (192, 6, 32)
    assert simmim.encoder_stride(simmim.config("vit")) == 16
    with pytest.raises(ValueError, match="unknown SimMIM encoder"):
        simmim.config("resnet")


# ---------------------------------------------------------------- checkpoints


def official_sd(params, cfg):
    """What microsoft's training script would save: ``{"model": state_dict}`` with buffers."""
    return {"model": ckpt.export_official(params, cfg)}


def test_export_adds_official_buffers_and_load_round_trips(tmp_path):
    cfg = swin_cfg()
    params = simmim.init(torch.Generator().manual_seed(0), cfg)
    sd = official_sd(params, cfg)["model"]
    assert "encoder.layers.0.blocks.0.attn.relative_position_index" in sd
    assert "encoder.layers.0.blocks.1.attn_mask" in sd
    assert "encoder.layers.0.blocks.0.attn_mask" not in sd            # no shift, no buffer
    assert "encoder.layers.1.blocks.1.attn_mask" in sd                # 8x8 > window 4: shifted
    keys = list(sd)
    i = keys.index("encoder.layers.0.blocks.1.attn_mask")
    assert keys[i + 1] == "encoder.layers.0.blocks.1.norm1.weight"
    path = tmp_path / "simmim.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    back = ckpt.load_official(path, cfg)
    assert tree.structure_equal(back, params)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(params)))
    st = tmp_path / "simmim.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tree.flatten(params).items()}, str(st))
    back = ckpt.load_official(st, cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(params)))


def test_swin_classification_checkpoint_and_timm_layout():
    cfg = swin.config(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                      num_classes=5)
    params = swin.init(torch.Generator().manual_seed(0), cfg)
    back = ckpt.load_official({"model": ckpt.export_official(params, cfg)}, cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(params)))
    m = timm_swin.SwinTransformer(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                  window_size=4, num_classes=5)
    timm_sd = timm_swin.checkpoint_filter_fn(tree.flatten(params), m)
    back = ckpt.load_official(timm_sd, cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(params)))


def test_load_errors_name_the_keys(tmp_path):
    cfg = swin_cfg()
    sd = tree.flatten(simmim.init(torch.Generator(), cfg))
    bad = dict(sd)
    bad.pop("encoder.norm.weight")
    bad["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['encoder.norm.weight'\].*unexpected keys "
                                         r"\['encoder.extra.weight'\]"):
        ckpt.load_official(bad, cfg)
    with pytest.raises(ValueError, match="not a Swin/ViT"):
        ckpt.load_official({"foo": torch.zeros(1)})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "evil": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        ckpt.load_official(path)


def test_simmim_to_swin_window6_to_window7():
    """192 px / window 6 pre-training -> 224 px / window 7 fine-tuning, scaled by 1/2:
    96 px window 6 (stages 24, 12, 6) -> 112 px window 7 (stages 28, 14, 7)."""
    pre_cfg = simmim.config("swin", encoder=dict(img_size=96, embed_dim=16, depths=(2, 2, 2),
                                                 num_heads=(1, 2, 4), window_size=6))
    pre = simmim.init(torch.Generator().manual_seed(0), pre_cfg)
    ft_cfg = swin.config(img_size=112, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                         window_size=7, num_classes=7, drop_path_rate=0.1)
    ft = ckpt.simmim_to_swin(pre, ft_cfg, torch.Generator().manual_seed(5))
    fresh = swin.init(torch.Generator().manual_seed(5), ft_cfg)
    assert tree.structure_equal(ft, fresh)
    assert torch.equal(ft["head"]["weight"], fresh["head"]["weight"])
    assert torch.equal(ft["layers"]["1"]["blocks"]["0"]["mlp"]["fc1"]["weight"],
                       pre["encoder"]["layers"]["1"]["blocks"]["0"]["mlp"]["fc1"]["weight"])
    key = "layers.2.blocks.1.attn.relative_position_bias_table"
    src = tree.flatten(pre)["encoder." + key]
    assert tree.flatten(ft)[key].shape == (13 * 13, 4)
    assert torch.equal(tree.flatten(ft)[key], relpos.resize(src, 7))
    # Centre offset (0, 0) sits on a source sample: unchanged by the interpolation.
    assert torch.allclose(tree.flatten(ft)[key][6 * 13 + 6], src[5 * 11 + 5], atol=1e-6)
    logits, _ = swin.apply(ft, torch.randn(1, 3, 112, 112), ft_cfg)
    assert logits.shape == (1, 7)
    bad = tree.flatten(pre)
    bad.pop("encoder.norm.bias")
    with pytest.raises(ValueError, match="norm.bias"):
        ckpt.simmim_to_swin(tree.unflatten(bad), ft_cfg)
