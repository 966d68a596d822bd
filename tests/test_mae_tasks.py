"""The MAE tasks through mim.train.loop.train: every MAE experiment's :tiny variant runs a
few steps, pretraining writes reconstruction pictures, a linear probe trains its head and
BN statistics only, and load_for_finetune turns a pretraining checkpoint into a ViT."""
import os

import pytest
import torch

from mim import config as config_lib
from mim import optim, tree
from mim.checkpoints import io
from mim.checkpoints import mae as mae_ckpt
from mim.models import mae, vit
from mim.tasks import linprobe, mae_pretrain
from conftest import experiment, few_steps
from mim.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("mae_base", "mae_large", "mae_base_finetune", "mae_large_finetune",
               "mae_base_linprobe")


@pytest.fixture(scope="module")
def pretrained(small_data, tmp_path_factory):
    """A 3-step :tiny pretraining run: (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("mae_pretrain"))
    c = few_steps("mae_base", small_data, **{"recon.every": 3, "recon.num_images": 4})
    return workdir, loop.train(c, workdir)


def test_pretrain_tiny_runs_and_writes_reconstructions(pretrained):
    workdir, summary = pretrained
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))
    # evaluate: the masked-patch loss over the eval split (fixed noise per image).
    assert summary["eval_count"] == 20 and 0 < summary["eval_loss"] < 10
    png = os.path.join(workdir, "reconstructions", "step_00000003.png")
    from PIL import Image
    img = Image.open(png)
    # 4 rows of 32 px + 5 gaps of 2 px; 4 columns likewise.
    assert img.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(workdir, "tb")))


@pytest.mark.parametrize("name", ["mae_large"])
def test_other_pretrain_tiny_runs(name, small_data, tmp_path):
    c = few_steps(name, small_data, **{"recon.every": 0})
    assert loop.train(c, str(tmp_path))["steps"] == 3
    assert not os.path.exists(tmp_path / "reconstructions")


@pytest.mark.parametrize("name", ["mae_base_finetune", "mae_large_finetune"])
def test_finetune_tiny_from_pretraining(name, small_data, pretrained, tmp_path):
    c = few_steps(name, small_data, **{"init.checkpoint": pretrained[0]})
    summary = loop.train(c, str(tmp_path))
    assert summary["eval_count"] == 20 and 0 <= summary["eval_acc1"] <= 100


def test_linprobe_trains_head_and_bn_only(small_data, pretrained, tmp_path):
    c = few_steps("mae_base_linprobe", small_data, **{"init.checkpoint": pretrained[0]})
    summary = loop.train(c, str(tmp_path))
    assert summary["eval_count"] == 20
    before = mae_ckpt.read_source(pretrained[0])
    saved = io.load_tensors(io.latest(str(tmp_path / "checkpoints"))[0])
    params = {k[len("params."):]: v for k, v in saved.items() if k.startswith("params.")}
    state = {k[len("model_state."):]: v for k, v in saved.items() if k.startswith("model_state.")}
    encoder = [k for k in params if not k.startswith("head.")]
    assert encoder and set(encoder) == {k for k in before if not k.startswith(("decoder", "mask"))}
    for k in encoder:
        assert torch.equal(params[k], before[k]), k
    assert sorted(k for k in params if k.startswith("head.")) == ["head.1.bias", "head.1.weight"]
    fresh, _ = linprobe.init(c, torch.Generator().manual_seed(c.seed))
    assert not torch.equal(params["head.1.weight"], fresh["head"]["1"]["weight"])
    assert int(state["head.0.num_batches_tracked"]) == 3
    assert state["head.0.running_mean"].abs().sum() > 0
    assert not torch.equal(state["head.0.running_var"], torch.ones(128))
    # An official-layout linear-probe file (params and BN statistics in one state_dict)
    # starts a probe with its statistics and head.
    official = tmp_path / "linprobe.pth"
    torch.save({"model": {**params, **state}}, official)
    c2 = few_steps("mae_base_linprobe", small_data, **{"init.checkpoint": str(official)})
    setup = loop.Setup(c2, str(tmp_path / "eval"))
    p2, s2 = setup.init_params()
    assert torch.equal(s2["head"]["0"]["running_var"], state["head.0.running_var"])
    assert torch.equal(p2["head"]["1"]["weight"], params["head.1.weight"])


def test_batch_norm_matches_torch():
    x = torch.randn(16, 8)
    bn = torch.nn.BatchNorm1d(8, affine=False, eps=1e-6)
    stats = {"running_mean": torch.zeros(8), "running_var": torch.ones(8),
             "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
    y, stats = linprobe.batch_norm(stats, x, train=True)
    assert torch.allclose(y, bn.train()(x), atol=1e-5)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(stats[k].float(), getattr(bn, k).float(), atol=1e-6), k
    y, _ = linprobe.batch_norm(stats, x, train=False)
    assert torch.allclose(y, bn.eval()(x), atol=1e-5)


def test_load_for_finetune_from_mim_pretraining(pretrained):
    workdir = pretrained[0]
    ckpt_dir = io.latest(os.path.join(workdir, "checkpoints"))[0]
    pre = mae_ckpt.read_source(ckpt_dir)
    c = experiment("mae_base_finetune")
    fresh = vit.init(torch.Generator().manual_seed(0), c.model)
    for source in (workdir, ckpt_dir, os.path.join(ckpt_dir, io.STATE)):
        out = mae_ckpt.load_for_finetune(fresh, source, c.model)
        assert tree.structure_equal(out, fresh)
        flat = tree.flatten(out)
        for k in flat:
            if k.startswith(("head.", "fc_norm.")):  # fresh, as main_finetune.py
                assert torch.equal(flat[k], tree.flatten(fresh)[k]), k
            else:
                assert torch.equal(flat[k], pre[k]), k
    # An official full-MAE file gives the same tree.
    official = os.path.join(workdir, "official.pth")
    mae_ckpt.save_official(mae_ckpt.load_official(pre, kind="mae", cfg=experiment("mae_base").model),
                           official)
    same = mae_ckpt.load_for_finetune(fresh, official, c.model)
    for k, v in tree.flatten(same).items():
        assert torch.equal(v, tree.flatten(out)[k]), k
    # Wrong model sizes are named.
    bigger = c.model.copy_and_resolve_references()
    bigger.embed_dim = 192
    bigger.num_heads = 3
    with pytest.raises(ValueError, match="shape"):
        mae_ckpt.load_for_finetune(vit.init(torch.Generator(), bigger), official, bigger)


def test_pretrain_param_rules():
    c = experiment("mae_base", None)
    rules = mae_pretrain.param_rules(c)
    flat = tree.flatten(mae.init(torch.Generator(), mae.config(**{**c.model.to_dict(), "depth": 1,
                                                                  "decoder_depth": 1})))
    trainable = optim.trainable_names(list(flat), rules.frozen)
    assert sorted(set(flat) - set(trainable)) == ["decoder_pos_embed", "pos_embed"]
    groups = optim.make_groups({n: flat[n].shape for n in trainable}, weight_decay=0.05,
                               no_decay_patterns=rules.no_decay)
    decayed = {n for g in groups if g.weight_decay for n in g.names}
    # timm's add_weight_decay: only 1-D tensors are exempt; the tokens are decayed.
    assert decayed == {n for n in trainable if flat[n].ndim > 1}
    assert {"cls_token", "mask_token"} <= decayed
    lp = linprobe.param_rules(experiment("mae_base_linprobe", None))
    names = ["cls_token", "blocks.0.attn.qkv.weight", "norm.weight", "head.1.weight", "head.1.bias"]
    assert optim.trainable_names(names, lp.frozen) == ["head.1.weight", "head.1.bias"]


REFERENCE = {
    # name: (base lr, global batch, epochs, warm-up epochs) of PRETRAIN.md / FINETUNE.md
    "mae_base": (1.5e-4, 4096, 800, 40),
    "mae_large": (1.5e-4, 4096, 800, 40),
    "mae_base_finetune": (5e-4, 1024, 100, 5),
    "mae_large_finetune": (1e-3, 1024, 50, 5),
    "mae_base_linprobe": (0.1, 16384, 90, 10),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_follow_the_reference(name):
    blr, batch, epochs, warmup = REFERENCE[name]
    for arg in (None, "tiny", "perf"):
        c = experiment(name, arg)
        if arg != "tiny":
            c.data.path = "/data/imagenet"
        config_lib.validate(c)
        assert c.optim.lr == 0
        assert config_lib.learning_rate(c) == pytest.approx(c.optim.base_lr * c.batch_size / 256)
    c = experiment(name, None)
    assert (c.optim.base_lr, c.batch_size, c.epochs, c.optim.warmup_epochs) == (blr, batch, epochs, warmup)
    if c.task == "mae_pretrain":
        assert (c.optim.b2, c.optim.weight_decay, c.model.mask_ratio) == (0.95, 0.05, 0.75)
        assert c.model.norm_pix_loss and tuple(c.data.crop_scale) == (0.2, 1.0)
    elif c.task == "classify":
        large = "large" in name
        assert (c.optim.layer_decay, c.model.drop_path_rate) == ((0.75, 0.2) if large else (0.65, 0.1))
        assert c.model.global_pool == "avg" and c.model.head_init_std == 2e-5
        assert (c.data.mixup, c.data.cutmix, c.data.label_smoothing, c.data.re_prob) == (0.8, 1.0, 0.1, 0.25)
        assert c.data.auto_augment == "rand-m9-mstd0.5-inc1" and c.optim.weight_decay == 0.05
    else:
        assert c.optim.name == "lars" and c.optim.weight_decay == 0 and c.model.global_pool == "token"
    with pytest.raises(ValueError, match="variant"):
        experiment(name, "huge")


def test_reconstruct_command(pretrained, tmp_path):
    from mim import reconstruct
    images = os.path.join(ROOT, "third_party", "cifar10-mini", "val", "cat")
    grid = reconstruct.make_grid(pretrained[0], images, str(tmp_path / "a.png"), max_images=3)
    assert grid.shape == (3 * 32 + 4 * 2, 4 * 32 + 5 * 2, 3)
    # From an official file with an explicit config, another mask ratio and seed.
    pre = mae_ckpt.read_source(pretrained[0])
    c = experiment("mae_base")
    mae_ckpt.save_official(mae_ckpt.load_official(pre, c.model, kind="mae"), tmp_path / "m.pth")
    other = reconstruct.make_grid(str(tmp_path / "m.pth"), images, str(tmp_path / "b.png"), config=c,
                                  mask_ratio=0.5, seed=1, max_images=3)
    assert other.shape == grid.shape and not (other == grid).all()
    assert os.path.exists(tmp_path / "b.png")
