"""mim's ViT against timm's VisionTransformer with the same weights."""
import pytest
import timm
import torch

from mim import tree
from mim.checkpoints import timm_vit
from mim.models import vit


def _pair(**kw):
    cfg = vit.config(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10, **kw)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
        global_pool=cfg.global_pool, init_values=cfg.layer_scale_init or None).eval()
    # Randomise every tensor (norms and biases too) so that a swapped key cannot hide.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, ref


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg"), dict(layer_scale_init=0.1)])
def test_timm_state_dict_gives_timm_logits(kw):
    cfg, ref = _pair(**kw)
    params = tree.unflatten(dict(ref.state_dict()))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        got, aux = vit.apply(params, x, cfg)
    assert (got - want).abs().max().item() < 1e-5
    assert aux["pre_logits"].shape == (3, 64)


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg"), dict(layer_scale_init=0.1)])
def test_init_layout_and_export_load_strict(kw):
    cfg, ref = _pair(**kw)
    params = vit.init(torch.Generator().manual_seed(0), cfg)
    sd = timm_vit.to_state_dict(params)
    assert list(sd) == list(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - vit.apply(params, x, cfg)[0]).abs().max().item() < 1e-5


def test_init_is_pure():
    cfg = vit.config(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    a = vit.init(torch.Generator().manual_seed(5), cfg)
    b = vit.init(torch.Generator().manual_seed(5), cfg)
    c = vit.init(torch.Generator().manual_seed(6), cfg)
    fa, fb, fc = tree.flatten(a), tree.flatten(b), tree.flatten(c)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not torch.equal(fa["blocks.0.attn.qkv.weight"], fc["blocks.0.attn.qkv.weight"])


def test_finetune_from_timm_file_new_head_and_resized_pos_embed(tmp_path):
    """A 1000-class 32-px checkpoint starts a 10-class 48-px model: new (zero) head,
    bicubically resized position embedding, every other tensor copied."""
    src_cfg = vit.config(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=1000)
    src = vit.init(torch.Generator().manual_seed(0), src_cfg)
    import safetensors.torch
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(timm_vit.to_state_dict(src), path)
    dst_cfg = vit.config(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10,
                         head_init_std=0.0)
    dst = timm_vit.load_for_finetune(vit.init(torch.Generator().manual_seed(1), dst_cfg), path, dst_cfg)
    assert torch.equal(dst["head"]["weight"], torch.zeros(10, 32))
    assert dst["pos_embed"].shape == (1, 37, 32)
    assert torch.equal(dst["pos_embed"][:, 0], src["pos_embed"][:, 0])
    assert torch.equal(dst["blocks"]["0"]["mlp"]["fc1"]["weight"], src["blocks"]["0"]["mlp"]["fc1"]["weight"])
    # resizing to the same grid is the identity, and a 4x4 -> 6x6 bicubic resize matches torch's
    same = vit.resize_pos_embed(src["pos_embed"], 4)
    assert torch.equal(same, src["pos_embed"])
    grid = src["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dst["pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 32))


def test_layer_id_matches_beit_mae_rule():
    cfg = vit.config(depth=12)
    assert vit.layer_id("cls_token", cfg) == 0
    assert vit.layer_id("patch_embed.proj.weight", cfg) == 0
    assert vit.layer_id("blocks.0.norm1.weight", cfg) == 1
    assert vit.layer_id("blocks.11.mlp.fc2.bias", cfg) == 12
    assert vit.layer_id("fc_norm.weight", cfg) == 13
    assert vit.layer_id("head.weight", cfg) == 13
