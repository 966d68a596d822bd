"""mim.convert: every official format goes official -> mim -> official with the same keys
and values; the official inputs come from independent sources where one exists (timm,
the nn.Module re-statements of the references in the other tests). Also
``python -m mim.models``: its parameter counts and FLOPs against timm's models."""
import pytest
import timm
import torch

from conftest import ROOT
from mim import convert, tree
from mim.models import mae, simmim, swin, vit

pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(sd, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in sd.items()}


def timm_vit(global_pool):
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
        global_pool=global_pool, fc_norm=global_pool == "avg")
    return randomised(m.state_dict())


def vit_cfg(global_pool):
    return vit.config(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                      num_classes=10, global_pool=global_pool)


def official_mae():
    from test_mae_model import TINY, make_reference
    cfg = mae.config(**TINY, norm_pix_loss=False)
    return make_reference().state_dict(), cfg


def official_beit(kind):
    import test_beit_checkpoints as tb
    if kind == "pretrain":
        cfg = tb.pretrain_cfg()
        return tb.official_pretrain(cfg).state_dict(), cfg
    cfg = tb.finetune_cfg(global_pool="avg")
    return tb.official_finetuned(cfg).state_dict(), cfg


def swin_cfg():
    return swin.config(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                       window_size=4, num_classes=10)


def official_swin():
    """timm's Swin weights (timm's layout, which the swin format also reads) -> official layout."""
    cfg = swin_cfg()
    m = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
        num_classes=10)
    from mim.checkpoints import swin as swin_ckpt
    params = swin_ckpt.load_official(randomised(m.state_dict()), cfg)
    return swin_ckpt.export_official(params, cfg), cfg


def official_simmim():
    from mim.checkpoints import swin as swin_ckpt
    cfg = simmim.config("swin", encoder=dict(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2),
                                             num_heads=(2, 4), window_size=4), mask_patch_size=8)
    params = tree.map(lambda t: t + 0.1, simmim.init(torch.Generator().manual_seed(0), cfg))
    return swin_ckpt.export_official(params, cfg), cfg


def official_moby():
    from mim.checkpoints import moby as moby_ckpt
    from test_moby import perturbed_state, tiny_cfg
    cfg = tiny_cfg()
    params, state = perturbed_state(cfg, ptr=3)
    return moby_ckpt.export_official(params, state, cfg), cfg


CASES = {
    "timm": lambda: (timm_vit("token"), vit_cfg("token")),
    "mae_finetune": lambda: (timm_vit("avg"), vit_cfg("avg")),
    "mae": official_mae,
    "swin": official_swin,
    "simmim": official_simmim,
    "beit": lambda: official_beit("pretrain"),
    "beit_finetuned": lambda: official_beit("finetuned"),
    "moby": official_moby,
}


def test_every_format_has_a_round_trip_case():
    assert set(convert.available()) <= {c.split("_finetuned")[0] for c in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, tmp_path):
    fmt = case.split("_finetuned")[0]
    if fmt not in convert.available():
        pytest.skip(f"{fmt} has no checkpoint module in this tree")
    sd, cfg = CASES[case]()
    src, mid, out = (str(tmp_path / n) for n in ("official.pth", "tree.safetensors", "back.pth"))
    torch.save({"model": sd}, src)
    convert.convert(src, mid, fmt, "mim", cfg)
    # The mim file holds the tree and its config: the way back needs no --config.
    convert.convert(mid, out, "mim", fmt)
    back = torch.load(out, weights_only=True)["model"]
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    # The tree's names are the official ones (buffers aside), values untouched.
    params, state, saved_cfg = convert.load_mim(mid)
    assert saved_cfg.to_dict() == cfg.to_dict()
    flat = {**tree.flatten(params), **tree.flatten(state)}
    for k, v in flat.items():
        assert torch.equal(v, sd[k]), k
    # As a bare safetensors file too.
    convert.convert(mid, str(tmp_path / "back.safetensors"), "mim", fmt)
    import safetensors.torch
    bare = safetensors.torch.load_file(str(tmp_path / "back.safetensors"))
    assert set(bare) == set(sd) and all(torch.equal(bare[k], sd[k]) for k in sd)


def test_errors_name_the_problem(tmp_path):
    sd, cfg = timm_vit("token"), vit_cfg("token")
    src = str(tmp_path / "w.pth")
    torch.save(sd, src)
    with pytest.raises(convert.ConvertError, match="pass --config"):
        convert.convert(src, str(tmp_path / "o.safetensors"), "timm", "mim")
    with pytest.raises(convert.ConvertError, match="format 'mae' holds mae models; the config's model is 'vit'"):
        convert.convert(src, str(tmp_path / "o.safetensors"), "mae", "mim", cfg)
    with pytest.raises(convert.ConvertError, match="unknown format 'vit'"):
        convert.convert(src, str(tmp_path / "o.safetensors"), "vit", "mim", cfg)
    # A config with a block more than the weights: the missing keys are named.
    three = vit.config(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.2"):
        convert.convert(src, str(tmp_path / "o.safetensors"), "timm", "mim", three)
    mid = str(tmp_path / "t.safetensors")
    convert.convert(src, mid, "timm", "mim", cfg)
    with pytest.raises(convert.ConvertError, match="holds vit models|holds swin models"):
        convert.convert(mid, str(tmp_path / "o.pth"), "mim", "swin")


def test_cli_help_and_a_conversion(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name in ["mim", *convert.available()]:
        assert f"\n  {name} " in help_text, name
    # The :tiny ViT of experiments/vit_b32.py, from timm's weights and back.
    m = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=128,
                                                         depth=4, num_heads=4, num_classes=10)
    sd = randomised(m.state_dict())
    torch.save(sd, tmp_path / "timm.pth")
    convert.main(["--from=timm", "--to=mim", f"--config={ROOT}/experiments/vit_b32.py:tiny",
                  str(tmp_path / "timm.pth"), str(tmp_path / "t.safetensors")])
    convert.main(["--from=mim", "--to=timm", str(tmp_path / "t.safetensors"), str(tmp_path / "b.pth")])
    back = torch.load(tmp_path / "b.pth", weights_only=True)["model"]
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # A usage mistake is one line on stderr and exit status 2 (argparse).
    with pytest.raises(SystemExit) as e:
        convert.main(["--from=timm", "--to=mim", str(tmp_path / "timm.pth"), str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "pass --config" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# python -m mim.models


def test_model_list_counts_against_timm():
    from torch.utils.flop_counter import FlopCounterMode

    from mim.models import __main__ as listing
    by_name = {(e.model, e.size): e for e in listing.entries()}
    # Parameters and one forward + backward of timm's ViT-Ti/16 and Swin-T at 224 px.
    for key, make in ((("vit", "tiny/16"), lambda: timm.create_model("vit_tiny_patch16_224")),
                      (("swin", "tiny"), lambda: timm.create_model("swin_tiny_patch4_window7_224"))):
        n, flops = listing.measure(by_name[key])
        ref = make()
        assert n == sum(p.numel() for p in ref.parameters()), key
        x = torch.zeros(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            ref(x).sum().backward()
        assert flops == counter.get_total_flops(), key
    # Every format a model lists is one mim.convert knows.
    assert set(f for fs in listing.LOADS.values() for f in fs) - {"dalle"} <= set(convert.FORMATS)
    assert {e.model for e in listing.entries()} >= {"vit", "mae", "swin", "beit", "simmim"}
