"""Import/export of official MAE checkpoints, and MAE encoder -> fine-tuning ViT, checked
against the reference module of test_mae_model.py and timm's VisionTransformer."""
import argparse

import pytest
import timm
import torch

from mim import tree as T
from mim.checkpoints import mae as ckpt
from mim.models import mae, vit
from test_mae_model import TINY, make_reference

ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# What TINY's weights cannot tell, stated as a user importing them would.
STATED = dict(num_heads=4, decoder_num_heads=4, norm_eps=1e-6, norm_pix_loss=False, mask_ratio=0.75)
ENCODER_STATED = dict(num_heads=4, norm_eps=1e-6)


def vit_cfg(**overrides):
    fields = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                  global_pool="avg", head_init_std=2e-5, drop_path_rate=0.1)
    fields.update(overrides)
    return vit.config(**fields)


def timm_vit(cfg):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, num_classes=cfg.num_classes,
        global_pool=cfg.global_pool, class_token=True, qkv_bias=True).eval()


def assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_roundtrip_file_and_state_dict(tmp_path):
    sd = make_reference().state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd}, path)
    params = ckpt.load_official(path, **STATED)
    assert T.structure_equal(params, mae.init(torch.Generator(), mae.config(**TINY)))
    assert_same_state_dict(ckpt.export_official(params), sd)
    # Bare state_dict, in memory: copied, so later in-place updates leave it alone.
    params = ckpt.load_official(sd, **STATED)
    params["norm"]["weight"].add_(1.0)
    assert not torch.equal(params["norm"]["weight"], sd["norm.weight"])


def test_save_official_and_safetensors(tmp_path):
    sd = make_reference().state_dict()
    params = ckpt.load_official(sd, **STATED)
    ckpt.save_official(params, tmp_path / "out.pth")
    obj = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(obj) == {"model"}
    assert_same_state_dict(obj["model"], sd)
    ckpt.save_official(params, tmp_path / "out.safetensors")
    back = ckpt.load_official(tmp_path / "out.safetensors", **STATED)
    assert_same_state_dict(ckpt.export_official(back), sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "out.safetensors"]


def test_training_checkpoint_with_args(tmp_path):
    """The reference's checkpoint-N.pth also stores optimizer state and an argparse
    Namespace; weights_only loading must still accept it."""
    sd = make_reference().state_dict()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(lr=1e-3)}, path)
    assert_same_state_dict(ckpt.export_official(ckpt.load_official(path, **STATED)), sd)


def test_infer_config_takes_shapes_from_weights_and_the_rest_from_the_caller():
    flat = make_reference().state_dict()
    assert ckpt.detect_kind(flat) == "mae"
    cfg = ckpt.infer_config(flat, **STATED)
    for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "decoder_embed_dim",
              "decoder_depth", "mlp_ratio"):
        assert cfg[k] == TINY[k], k
    assert (cfg.num_heads, cfg.decoder_num_heads) == (4, 4)
    with pytest.raises(ValueError, match="does not record decoder_num_heads"):
        ckpt.infer_config(flat, **{k: v for k, v in STATED.items() if k != "decoder_num_heads"})


def test_named_architecture_from_saved_args():
    """models_mae.mae_vit_huge_patch14_dec512d8b: 16 encoder and 16 decoder heads, eps 1e-6
    (the weights' shapes on the meta device)."""
    with torch.device("meta"):
        big = T.flatten(mae.init(torch.Generator(), mae.config(img_size=224, **mae.SIZES["huge"])))
    args = {"model": "mae_vit_huge_patch14", "norm_pix_loss": True, "mask_ratio": 0.75}
    cfg = ckpt.infer_config(big, args=args)
    assert (cfg.patch_size, cfg.embed_dim, cfg.num_heads, cfg.decoder_num_heads) == (14, 1280, 16, 16)
    assert cfg.norm_pix_loss is True and cfg.norm_eps == 1e-6
    # The name alone leaves the training settings unstated.
    with pytest.raises(ValueError, match="does not record norm_pix_loss, mask_ratio"):
        ckpt.infer_config(big, arch="mae_vit_huge_patch14")
    with pytest.raises(ValueError, match="not one of the reference's architectures"):
        ckpt.infer_config(big, arch="mae_vit_giant_patch14", **STATED)


def test_bad_checkpoints_name_the_problem():
    sd = make_reference().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.norm2.bias'\]"):
        ckpt.load_official(missing, **STATED)
    extra = {**sd, "decoder_extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="unexpected keys.*decoder_extra.weight"):
        ckpt.load_official(extra, **STATED)
    wrong = {**sd, "norm.bias": torch.zeros(65)}
    with pytest.raises(ValueError, match=r"norm.bias: \(65,\) != \(64,\)"):
        ckpt.load_official(wrong, **STATED)
    with pytest.raises(ValueError, match="embed_dim|shape"):
        ckpt.load_official(sd, mae.config(**{**TINY, "embed_dim": 128}))
    probe = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask"))}
    probe.update({"head.0.running_mean": torch.zeros(64), "head.1.weight": torch.zeros(10, 64)})
    with pytest.raises(ValueError, match="linear-probe"):
        ckpt.load_official(probe)
    with pytest.raises(ValueError, match="layout"):
        ckpt.load_official({"foo": torch.zeros(1)})


def test_encoder_to_vit_matches_timm():
    params = ckpt.load_official(make_reference().state_dict(), **STATED)
    cfg = vit_cfg()
    v = ckpt.encoder_to_vit(params, cfg, torch.Generator().manual_seed(0))
    model = timm_vit(cfg)
    model.load_state_dict(T.flatten(v), strict=True)
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert torch.equal(T.flatten(v)[k], T.flatten(params)[k])
    assert "norm" not in v and torch.equal(v["fc_norm"]["weight"], torch.ones(64))
    assert torch.all(v["head"]["bias"] == 0) and 0 < v["head"]["weight"].std() < 4e-5
    # A visible head so that the logits compare more than the bias.
    v["head"]["weight"] = torch.randn(10, 64)
    model.load_state_dict(T.flatten(v), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, _ = vit.apply(v, x, cfg)
        assert (logits - model(x)).abs().max() < 1e-5


def test_encoder_to_vit_token_pool_keeps_norm():
    params = ckpt.load_official(make_reference().state_dict(), **STATED)
    cfg = vit_cfg(global_pool="token", head_init_std=0.01)
    v = ckpt.encoder_to_vit(params, cfg)
    assert torch.equal(v["norm"]["weight"], params["norm"]["weight"]) and "fc_norm" not in v
    timm_vit(cfg).load_state_dict(T.flatten(v), strict=True)


def test_encoder_to_vit_interpolates_pos_embed():
    params = ckpt.load_official(make_reference().state_dict(), **STATED)
    cfg = vit_cfg(img_size=48)
    v = ckpt.encoder_to_vit(params, cfg)
    assert v["pos_embed"].shape == (1, 1 + 6 * 6, 64)
    assert torch.equal(v["pos_embed"][:, :1], params["pos_embed"][:, :1])
    timm_vit(cfg).load_state_dict(T.flatten(v), strict=True)
    with pytest.raises(ValueError, match="shape"):
        ckpt.encoder_to_vit(params, vit_cfg(embed_dim=96))
    with pytest.raises(ValueError, match="class_token"):
        ckpt.encoder_to_vit(params, vit_cfg(class_token=False))


def test_encoder_only_checkpoint(tmp_path):
    """The released mae_pretrain_vit_*.pth files hold the encoder only."""
    sd = {k: v for k, v in make_reference().state_dict().items() if k.startswith(ENCODER)}
    torch.save({"model": sd}, tmp_path / "enc.pth")
    params = ckpt.load_official(tmp_path / "enc.pth", **ENCODER_STATED)
    assert ckpt.detect_kind(sd) == "mae_encoder"
    assert_same_state_dict(ckpt.export_official(params), sd)
    timm_vit(vit_cfg()).load_state_dict(T.flatten(ckpt.encoder_to_vit(params, vit_cfg())), strict=True)


def test_finetuned_vit_checkpoint(tmp_path):
    """A fine-tuned models_vit checkpoint is timm's layout and loads as a vit tree."""
    cfg = vit_cfg()
    torch.manual_seed(0)
    model = timm_vit(cfg)
    sd = model.state_dict()
    torch.save({"model": sd}, tmp_path / "ft.pth")
    params, got_cfg = ckpt.load_official(tmp_path / "ft.pth", return_config=True, **ENCODER_STATED)
    assert got_cfg.name == "vit" and got_cfg.global_pool == "avg" and got_cfg.num_classes == 10
    assert_same_state_dict(ckpt.export_official(params, "vit"), sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, _ = vit.apply(params, x, vit_cfg())
        assert (logits - model(x)).abs().max() < 1e-5


def test_in_memory_checkpoint_is_copied():
    sd = make_reference().state_dict()
    for src in (sd, {"model": sd}):
        params = ckpt.load_official(src, **STATED)
        params["cls_token"].add_(1.0)
        assert not torch.equal(params["cls_token"], sd["cls_token"])


# ------------------------------------------------------------------- nothing is guessed


def _reference_predictions(ref, imgs, noise):
    with torch.no_grad():
        return ref(imgs, noise)[1]


def test_width_64_with_4_heads_is_never_taken_for_another_model(tmp_path):
    """A 64-wide, 4-head official MAE (facebookresearch/mae semantics, mim.peers.MAE): its
    weights cannot tell the head counts, so loading without a config stops naming them;
    with the config the loaded tree predicts what the reference predicts."""
    ref = make_reference()
    path = tmp_path / "mae_tiny.pth"
    torch.save({"model": ref.state_dict()}, path)
    with pytest.raises(ValueError, match="num_heads, decoder_num_heads") as err:
        ckpt.load_official(path)
    assert "cfg=mim.models.mae.config" in str(err.value)
    cfg = mae.config(**TINY)
    params = ckpt.load_official(path, cfg)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    noise = mae.noise(g, 2, cfg)
    with torch.no_grad():
        _, aux = mae.apply(params, imgs, noise, cfg)
    want = _reference_predictions(ref, imgs, noise)
    assert (aux["pred"] - want).abs().max() < 1e-5
    # What the old width rule (64 -> 1 head) would have run is a different model.
    wrong = mae.config(**{**TINY, "num_heads": 1, "decoder_num_heads": 16})
    with torch.no_grad():
        assert (mae.apply(params, imgs, noise, wrong)[1]["pred"] - want).abs().max() > 1e-2


def test_saved_training_args_state_the_target_and_guard_the_config(tmp_path):
    """main_pretrain.py saves {"model", "args"}; its norm_pix_loss and mask_ratio are read
    (weights_only), and a config contradicting them is refused."""
    ref = make_reference(norm_pix_loss=True)
    path = tmp_path / "checkpoint-1.pth"
    args = argparse.Namespace(model="tiny_custom", norm_pix_loss=True, mask_ratio=0.5, lr=1e-3)
    torch.save({"model": ref.state_dict(), "epoch": 1, "args": args}, path)
    # The saved args state the training settings; the head counts and eps remain unstated.
    with pytest.raises(ValueError, match=r"does not record num_heads, decoder_num_heads, norm_eps \("):
        ckpt.load_official(path)
    _, cfg = ckpt.load_official(path, return_config=True, num_heads=4, decoder_num_heads=4,
                                norm_eps=1e-6)
    assert cfg.norm_pix_loss is True and cfg.mask_ratio == 0.5
    with pytest.raises(ValueError, match="norm_pix_loss"):
        ckpt.load_official(path, mae.config(**TINY, norm_pix_loss=False))
    with pytest.raises(ValueError, match=r"norm_pix_loss=False \(stated: True\)"):
        ckpt.load_official(path, num_heads=4, decoder_num_heads=4, norm_eps=1e-6, norm_pix_loss=False)
    with pytest.raises(ValueError, match="either cfg or fields"):
        ckpt.load_official(path, mae.config(**TINY, norm_pix_loss=True), num_heads=4)
    # The same settings from the caller: the loaded model's loss is the reference's.
    cfg = mae.config(**TINY, norm_pix_loss=True)
    params = ckpt.load_official(path, cfg)
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    noise = mae.noise(g, 2, cfg)
    with torch.no_grad():
        loss, _ = mae.apply(params, imgs, noise, cfg)
        assert abs(loss.item() - ref(imgs, noise)[0].item()) < 1e-5


def test_finetuned_vit_needs_its_head_count(tmp_path):
    cfg = vit_cfg()
    torch.save({"model": timm_vit(cfg).state_dict()}, tmp_path / "ft.pth")
    with pytest.raises(ValueError, match="does not record num_heads, norm_eps"):
        ckpt.load_official(tmp_path / "ft.pth")
    with pytest.raises(ValueError, match=r"embed_dim=768 \(weights: 64\)"):
        ckpt.load_official(tmp_path / "ft.pth", arch="vit_base_patch16")
