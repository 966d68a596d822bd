"""Evaluation of any encoder: linear probes on ViT, BEiT-style ViT and Swin (pooled
features, per-block probes), and k-NN during a run and on a checkpoint."""
import json

import pytest
import timm
import torch

from mim import config as config_lib
from mim import tree
from mim.checkpoints import io
from mim.models import beit, swin
from mim.tasks import linprobe
from mim.train import loop

TINY = {
    "swin": lambda: swin.config(img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                window_size=4, drop_path_rate=0.0, num_classes=10),
    "beit": lambda: beit.config(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                drop_path_rate=0.0, num_classes=10),
}


def probe_config(data, name, features="pooled", batch_norm=False):
    c = config_lib.base()
    c.task = "linprobe"
    c.model = TINY[name]()
    with c.unlocked():
        c.model.head_init_std = 0.01
    c.probe = linprobe.probe_config(features, batch_norm)
    c.data.path = data
    c.data.image_size = 32
    c.data.crop_pct = 1.0
    c.data.num_workers = 0
    c.batch_size = 16
    c.eval_batch_size = 20
    c.steps = 4
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 4
    c.init.format = "mim"
    c.optim.name = "sgd"
    c.optim.lr = 0.1
    return c


@pytest.mark.parametrize("name,features,batch_norm", [("swin", "pooled", False), ("beit", "pooled", True),
                                                      ("beit", "blocks", False)])
def test_linear_probe_trains_only_the_classifier(name, features, batch_norm, small_data, tmp_path, one_thread):
    c = probe_config(small_data, name, features, batch_norm)
    fresh, _ = linprobe.init(c, torch.Generator().manual_seed(c.seed))
    summary = loop.train(c, str(tmp_path))
    saved = io.load_tensors(io.latest(str(tmp_path / "checkpoints"))[0])
    params = {k[len("params."):]: v for k, v in saved.items() if k.startswith("params.")}
    before = tree.flatten(fresh)
    heads = {k for k in params if k.startswith(("head.", "linear."))}
    if features == "blocks":
        assert heads == {f"linear.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
        assert summary["eval_best_block"] in (0, 1)
        assert summary["eval_acc1"] == max(summary["eval_acc1_block0"], summary["eval_acc1_block1"])
    else:
        assert heads == ({"head.1.weight", "head.1.bias"} if batch_norm else {"head.weight", "head.bias"})
    for k, v in params.items():
        if k in heads:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_block_probe_features_are_class_token_and_patch_mean_of_each_block(small_data):
    """concat(class token, mean of patch tokens) of each block's output, as BEiT's
    run_linear_eval.py reads ``get_intermediate_layers``; checked on timm's Beit."""
    c = probe_config(small_data, "beit", "blocks")
    params, _ = linprobe.init(c, torch.Generator().manual_seed(0))
    m = c.model
    ref = timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                num_classes=0, use_abs_pos_emb=False, use_rel_pos_bias=True,
                                init_values=0.1, global_pool="avg").eval()
    enc = {k: v for k, v in tree.flatten(params).items() if not k.startswith("linear.")}
    sd = ref.state_dict()
    missing = ref.load_state_dict({**{k: v for k, v in sd.items() if "relative_position_index" in k},
                                   **enc}, strict=False)
    assert not missing.unexpected_keys
    x = torch.randn(3, 3, 32, 32)
    got = linprobe.probe_inputs(params, x, c)
    with torch.no_grad():
        t = ref.patch_embed(x)
        t = torch.cat([ref.cls_token.expand(3, -1, -1), t], 1)
        want = []
        for blk in ref.blocks:
            t = blk(t, shared_rel_pos_bias=None)
            want.append(torch.cat([t[:, 0], t[:, 1:].mean(1)], -1))
    assert len(got) == m.depth
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_knn_during_a_run_and_on_a_checkpoint(small_data, tmp_path, one_thread):
    from conftest import few_steps
    c = few_steps("simmim_swin_base", small_data, knn_every=3, **{"data.num_workers": 0})
    loop.train(c, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    knn_rows = [r for r in rows if "knn/acc1" in r]
    assert knn_rows and knn_rows[-1]["step"] == 3 and knn_rows[-1]["knn/count"] == 20
    assert knn_rows[-1]["knn/train_images"] == 120
    c.mode = "knn"
    result = loop.knn_only(c, str(tmp_path))
    assert result["acc1"] == knn_rows[-1]["knn/acc1"]


def test_knn_of_a_linear_probe_reads_its_frozen_encoder(small_data, tmp_path, one_thread):
    """A probe's k-NN (knn_every, as moby_swin_tiny_linear.py:tiny reports it) is the k-NN
    of the encoder it starts from: the same as mode=knn on the pretraining run."""
    from conftest import few_steps
    pre = tmp_path / "pre"
    c = few_steps("moby_swin_tiny", small_data, knn_every=0, **{"data.num_workers": 0})
    loop.train(c, str(pre))
    c.mode = "knn"
    want = loop.knn_only(c, str(pre))
    lin = few_steps("moby_swin_tiny_linear", small_data, knn_every=3,
                    **{"data.num_workers": 0, "init.checkpoint": str(pre)})
    out = loop.train(lin, str(tmp_path / "lin"))
    assert out["eval_knn_acc1"] == want["acc1"] and out["eval_knn_count"] == 20
