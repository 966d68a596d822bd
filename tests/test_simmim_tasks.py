"""The SimMIM task and recipe through mim.train.loop.train: every SimMIM experiment's :tiny
variant runs a few steps, pretraining writes reconstruction pictures, a tiny fine-tuning
run starts from the tiny pretraining run, load_for_finetune turns a SimMIM checkpoint into
a Swin (window 6 -> 7) or ViT tree, and the learning rates are the reference's."""
import os

import pytest
import torch

from mim import config as config_lib
from mim import optim, tree
from mim.checkpoints import io
from mim.checkpoints import swin as swin_ckpt
from mim.data import masks
from mim.models import beit, simmim, swin, vit
from mim.tasks import classify, simmim_pretrain
from conftest import experiment, few_steps
from mim.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ("simmim_swin_base", "simmim_vit_base")
FINETUNE = {"simmim_swin_base": "simmim_swin_base_finetune",
            "simmim_vit_base": "simmim_vit_base_finetune"}


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """3-step :tiny pretraining runs: {experiment: (workdir, summary)}."""
    out = {}
    for name in PRETRAIN:
        workdir = str(tmp_path_factory.mktemp(name))
        c = few_steps(name, small_data, **{"recon.every": 3, "recon.num_images": 4})
        out[name] = workdir, loop.train(c, workdir)
    return out


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_tiny_runs_and_writes_reconstructions(pretrained, name):
    workdir, summary = pretrained[name]
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert 0 < summary["eval_loss"] < 5 and summary["eval_count"] == 20
    png = os.path.join(workdir, "reconstructions", "step_00000003.png")
    from PIL import Image
    img = Image.open(png)
    # 4 rows of 32-px cells and 4 columns, 2-px white padding.
    assert img.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))


@pytest.mark.parametrize("name", PRETRAIN)
def test_finetune_tiny_starts_from_the_tiny_pretraining(pretrained, small_data, tmp_path, name):
    """The chain of the docs: init.format="swin" with a pretraining workdir (for Swin a
    window change 4 -> 8, interpolating the tables)."""
    workdir, _ = pretrained[name]
    c = few_steps(FINETUNE[name], small_data, **{"init.checkpoint": workdir})
    summary = loop.train(c, str(tmp_path))
    assert summary["steps"] == 3 and 0 <= summary["eval_acc1"] <= 100


def test_finetune_tiny_from_random_init(small_data, tmp_path):
    c = few_steps("simmim_vit_base_finetune", small_data)
    assert loop.train(c, str(tmp_path))["steps"] == 3


# ----------------------------------------------------------------------------------------
# load_for_finetune


def save_mim_checkpoint(workdir, params):
    io.save(os.path.join(workdir, "checkpoints"), 7, {"params": params}, {"fingerprint": {}}, 1)


def swin_window(window, img):
    return dict(img_size=img, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                window_size=window)


def test_load_for_finetune_swin_window_6_to_7(tmp_path):
    """A simmim_pretrain mim checkpoint at 48 px / window 6 into a Swin at 56 px / window 7:
    every encoder weight equal, every table interpolated as interpolate_rel_pos_bias, a
    fresh head (the task's own), no mask token or decoder."""
    pre_cfg = simmim.config("swin", encoder=swin_window(6, 48))
    pre = tree.flatten(simmim.init(torch.Generator().manual_seed(1), pre_cfg))
    save_mim_checkpoint(str(tmp_path), tree.unflatten(pre))
    ft_cfg = swin.config(**swin_window(7, 56), num_classes=10, drop_path_rate=0.1)
    fresh = swin.init(torch.Generator().manual_seed(2), ft_cfg)
    out = tree.flatten(swin_ckpt.load_for_finetune(fresh, str(tmp_path), ft_cfg))
    assert list(out) == list(tree.flatten(fresh))
    tables = [k for k in out if k.endswith("relative_position_bias_table")]
    assert len(tables) == 4
    for k, v in out.items():
        if k in tables:
            assert pre["encoder." + k].shape == (11 * 11, v.shape[1]) and v.shape[0] == 13 * 13
            torch.testing.assert_close(v, swin_ckpt.interpolate_rel_pos_bias(pre["encoder." + k], 6, 7),
                                       rtol=0, atol=0)
        elif k.startswith("head."):
            assert torch.equal(v, tree.flatten(fresh)[k])
        else:
            assert torch.equal(v, pre["encoder." + k]), k
    # The same from the checkpoint directory itself and from the official layout.
    step_dir = io.latest(os.path.join(str(tmp_path), "checkpoints"))[0]
    again = tree.flatten(swin_ckpt.load_for_finetune(fresh, step_dir, ft_cfg))
    official = str(tmp_path / "simmim_official.pth")
    torch.save({"model": swin_ckpt.export_official(tree.unflatten(pre), pre_cfg)}, official)
    from_official = tree.flatten(swin_ckpt.load_for_finetune(fresh, official, ft_cfg))
    for k in out:
        assert torch.equal(again[k], out[k]) and torch.equal(from_official[k], out[k])


def test_load_for_finetune_swin_classification_checkpoint_keeps_matching_head(tmp_path):
    cfg = swin.config(**swin_window(4, 32), num_classes=10)
    trained = swin.init(torch.Generator().manual_seed(3), cfg)
    path = str(tmp_path / "swin.pth")
    torch.save({"model": swin_ckpt.export_official(trained, cfg)}, path)
    out = swin_ckpt.load_for_finetune(swin.init(torch.Generator().manual_seed(4), cfg), path, cfg)
    for k, v in tree.flatten(trained).items():
        assert torch.equal(tree.flatten(out)[k], v)


def test_load_for_finetune_vit(tmp_path):
    """SimMIM ViT pretraining (shared relative position bias) -> the fine-tuning ViT with a
    table per block, as remap_pretrained_keys_vit: the shared table copied into every block
    (resized, class-token rows kept, when the grid changes), mask token, decoder and final
    norm dropped, fc_norm and head fresh; every other weight equal."""
    enc = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    pre_cfg = simmim.config("vit", encoder=enc)
    gen = torch.Generator().manual_seed(1)
    pre = tree.map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen),
                   simmim.init(torch.Generator().manual_seed(1), pre_cfg))
    save_mim_checkpoint(str(tmp_path), pre)
    official = str(tmp_path / "simmim_vit_official.pth")
    torch.save({"model": swin_ckpt.export_official(pre, pre_cfg)}, official)
    pre = tree.flatten(pre)
    shared = pre["encoder.rel_pos_bias.relative_position_bias_table"]
    for img in (32, 48):
        cfg = beit.config(**dict(enc, img_size=img), num_classes=10)
        fresh = tree.flatten(beit.init(torch.Generator().manual_seed(2), cfg))
        out = tree.flatten(swin_ckpt.load_for_finetune(tree.unflatten(fresh), str(tmp_path), cfg))
        from_official = tree.flatten(swin_ckpt.load_for_finetune(tree.unflatten(fresh), official, cfg))
        assert list(out) == list(fresh) and "norm.weight" not in out
        assert not any(k.startswith("rel_pos_bias") for k in out)
        for k, v in out.items():
            assert torch.equal(from_official[k], v), k
            if k.startswith(("head.", "fc_norm.")):
                assert torch.equal(v, fresh[k])
            elif k.endswith("relative_position_bias_table"):
                want = shared if img == 32 else beit.resize_rel_pos_bias(shared, img // 4)
                torch.testing.assert_close(v, want, rtol=0, atol=0)
                assert torch.equal(v[-3:], shared[-3:])
            else:
                assert torch.equal(v, pre["encoder." + k]), k


def test_load_for_finetune_vit_classification_checkpoint_keeps_its_head(tmp_path):
    """A fine-tuned ViT (per-block tables, fc_norm, head; e.g. for --config.mode=eval)
    loads whole."""
    cfg = beit.config(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    trained = tree.map(lambda t: t + 1.0, beit.init(torch.Generator().manual_seed(3), cfg))
    path = str(tmp_path / "vit_ft.pth")
    torch.save({"model": swin_ckpt.export_official(trained, cfg)}, path)
    out = swin_ckpt.load_for_finetune(beit.init(torch.Generator().manual_seed(4), cfg), path, cfg)
    for k, v in tree.flatten(trained).items():
        assert torch.equal(tree.flatten(out)[k], v), k


def test_timm_layout_vit_is_a_clear_error(tmp_path):
    path = str(tmp_path / "simmim_vit.pth")
    torch.save({"model": {"encoder.rel_pos_bias.relative_position_bias_table": torch.zeros(3, 2),
                          "encoder.blocks.0.gamma_1": torch.zeros(4)}}, path)
    cfg = vit.config(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="model.name='beit'"):
        swin_ckpt.load_for_finetune(vit.init(torch.Generator(), cfg), path, cfg)


def test_finetune_param_rules_are_the_references():
    """build_finetune_optimizer for ViT: layer ids of get_vit_layer with num_layers =
    depth + 2, no decay on 1-D tensors, pos_embed and cls_token (the tables are decayed)."""
    c = experiment("simmim_vit_base_finetune", None)
    assert c.model.name == "beit" and classify.model(c) is beit
    rules = classify.param_rules(c)
    names = {n: t.shape for n, t in tree.flatten(beit.init(torch.Generator(), c.model)).items()}
    groups = optim.make_groups(names, weight_decay=0.05, no_decay_patterns=rules.no_decay,
                               layer_decay=0.65, layer_id=rules.layer_id, num_layers=rules.num_layers)
    scale = {n: g.lr_scale for g in groups for n in g.names}
    wd = {n: g.weight_decay for g in groups for n in g.names}
    assert scale["cls_token"] == pytest.approx(0.65 ** 13)
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.65 ** 13)
    assert scale["blocks.0.attn.relative_position_bias_table"] == pytest.approx(0.65 ** 12)
    assert scale["blocks.11.mlp.fc2.weight"] == pytest.approx(0.65)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert {n for n, d in wd.items() if d == 0} == {n for n, s in names.items() if len(s) == 1} | {"cls_token"}
    assert wd["blocks.3.attn.relative_position_bias_table"] == 0.05


# ----------------------------------------------------------------------------------------
# Recipe numbers


def test_learning_rates_are_the_references_at_batch_2048():
    """The reference's lr = BASE_LR * total_batch / 512 (main_simmim.py, main_finetune.py)
    with the configs' BASE_LR and MIN_LR and the README's 16 x 128 batch; mim's base_lr is
    per 256."""
    expected = {  # experiment: (BASE_LR, MIN_LR, WARMUP_LR) per 512, from configs/*.yaml
        "simmim_swin_base": (2e-4, 1e-5, 1e-6),
        "simmim_swin_base_finetune": (1.25e-3, 2.5e-7, 2.5e-7),
        "simmim_vit_base": (1e-4, 0.0, 5e-7),          # multistep: MIN_LR unused
        "simmim_vit_base_finetune": (1.25e-3, 2.5e-7, 2.5e-7),
    }
    for name, (base_lr, min_lr, warmup_lr) in expected.items():
        c = experiment(name, None)
        assert c.batch_size == 2048
        assert config_lib.learning_rate(c) == pytest.approx(base_lr * 2048 / 512)
        assert c.optim.base_lr == pytest.approx(base_lr / 2)
        assert c.optim.min_lr == pytest.approx(min_lr * 2048 / 512)
        assert c.optim.warmup_init_lr == pytest.approx(warmup_lr * 2048 / 512)
        assert c.optim.clip_grad == 5.0 and c.optim.weight_decay == 0.05
        assert c.optim.clip_mode == "micro_batch"
    v = experiment("simmim_vit_base", None)
    assert (v.optim.schedule, tuple(v.optim.milestones), v.optim.gamma) == ("timm_multistep", (700.0,), 0.1)
    s800 = experiment("simmim_swin_base", "epochs=800")
    assert (s800.epochs, s800.optim.schedule, tuple(s800.optim.milestones)) == (800, "timm_multistep", (700.0,))
    assert config_lib.learning_rate(s800) == pytest.approx(1e-4 * 2048 / 512)
    assert s800.optim.warmup_init_lr == pytest.approx(5e-7 * 2048 / 512)
    assert experiment("simmim_swin_base_finetune", None).optim.layer_decay == 0.9
    assert experiment("simmim_vit_base_finetune", None).optim.layer_decay == 0.65


def test_full_configs_validate_and_have_the_reference_geometry():
    c = experiment("simmim_swin_base", None, **{"data.path": "/data"})
    config_lib.validate(c)
    simmim_pretrain.check(c)
    e = c.model.encoder
    assert (e.img_size, e.window_size, e.embed_dim, tuple(e.depths)) == (192, 6, 128, (2, 2, 18, 2))
    assert (c.model.mask_patch_size, c.model.mask_ratio, c.epochs, c.optim.warmup_epochs) == (32, 0.6, 100, 10)
    ft = experiment("simmim_swin_base_finetune", None, **{"data.path": "/data"})
    config_lib.validate(ft)
    assert (ft.model.img_size, ft.model.window_size, ft.model.drop_path_rate) == (224, 7, 0.1)
    assert ft.init.format == "swin" and ft.optim.warmup_epochs == 20
    v = experiment("simmim_vit_base", None, **{"data.path": "/data"})
    config_lib.validate(v)
    simmim_pretrain.check(v)
    e = v.model.encoder
    assert (e.patch_size, e.img_size, v.epochs) == (16, 224, 800)
    assert (e.use_abs_pos_emb, e.use_shared_rel_pos_bias, e.use_rel_pos_bias) == (False, True, False)
    assert (e.layer_scale_init, e.drop_path_rate, e.qkv_bias) == (0.1, 0.1, True)
    vf = experiment("simmim_vit_base_finetune", None, **{"data.path": "/data"})
    config_lib.validate(vf)
    m = vf.model
    assert m.name == "beit" and (m.use_abs_pos_emb, m.use_rel_pos_bias, m.use_shared_rel_pos_bias) == \
        (False, True, False)
    assert (m.layer_scale_init, m.global_pool, m.drop_path_rate, m.init_scale) == (0.1, "avg", 0.1, 0.001)
    assert (vf.optim.layer_decay, vf.init.format, vf.optim.warmup_epochs) == (0.65, "swin", 20)


def test_pretrain_weight_decay_skips_the_references_names():
    """build_pretrain_optimizer: no decay on 1-D tensors and biases, on the encoder's
    no_weight_decay() names and no_weight_decay_keywords()."""
    c = experiment("simmim_swin_base", "tiny")
    c.model.encoder.ape = True
    names = tree.flatten(simmim.init(torch.Generator(), c.model))
    rules = simmim_pretrain.param_rules(c)
    groups = optim.make_groups({n: t.shape for n, t in names.items()}, weight_decay=0.05,
                               no_decay_patterns=rules.no_decay)
    no_decay = {n for g in groups if g.weight_decay == 0 for n in g.names}
    # The keyword becomes "encoder.relative_position_bias_table" in the reference, which is a
    # substring of no name: the tables are decayed while pretraining.
    expected = {n for n, t in names.items() if t.ndim == 1 or n in (
        "encoder.absolute_pos_embed", "encoder.mask_token")}
    assert no_decay == expected and "encoder.mask_token" in no_decay
    assert not any("relative_position_bias_table" in n for n in no_decay)
    v = experiment("simmim_vit_base", "tiny")
    vnames = tree.flatten(simmim.init(torch.Generator(), v.model))
    rules = simmim_pretrain.param_rules(v)
    groups = optim.make_groups({n: t.shape for n, t in vnames.items()}, weight_decay=0.05,
                               no_decay_patterns=rules.no_decay)
    no_decay = {n for g in groups if g.weight_decay == 0 for n in g.names}
    # VisionTransformerForSimMIM keeps its parent's {'pos_embed', 'cls_token'}: the mask
    # token is decayed.
    assert no_decay == {n for n, t in vnames.items() if t.ndim == 1 or n in
                        ("encoder.pos_embed", "encoder.cls_token")}


def test_batch_extras_mask_and_evaluate_match_the_loss():
    c = experiment("simmim_swin_base", "tiny")
    m = simmim_pretrain.batch_extras(torch.Generator().manual_seed(0), c)["mask"]
    assert m.shape == (8, 8) and m.sum() == masks.simmim_mask_count(32, 8, 0.6) * 4
    params = simmim.init(torch.Generator().manual_seed(0), c.model)
    batch = {"image": torch.randn(4, 3, 32, 32),
             "mask": torch.stack([simmim_pretrain.mask_for(torch.Generator().manual_seed(i), c)
                                  for i in range(4)])}
    value, _ = simmim_pretrain.loss(params, {}, batch, c, train=False)
    sums = {k: v.item() for k, v in simmim_pretrain.evaluate(params, {}, batch, c).items()}
    assert simmim_pretrain.summarize(sums)["loss"] == pytest.approx(value.item(), rel=1e-5)


def test_check_names_the_field():
    c = experiment("simmim_swin_base", "tiny")
    c.model.mask_patch_size = 12
    with pytest.raises(config_lib.ConfigError, match="mask_patch_size"):
        simmim_pretrain.check(c)
    c = experiment("simmim_swin_base", "tiny")
    c.data.image_size = 64
    with pytest.raises(config_lib.ConfigError, match="encoder.img_size"):
        simmim_pretrain.check(c)
