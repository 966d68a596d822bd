"""MoBY checkpoints: mim's importer and exporter against the reference's state-dict layout.

The layout reference is a skeleton re-stated here from SwinTransformer/Transformer-SSL
(``models/moby.py`` and ``models/swin_transformer.py``): modules registered in the
reference's order with its parameters and buffers (``relative_position_index`` after each
bias table, ``attn_mask`` registered by the shifted blocks, the MoBY queues), so its
``state_dict()`` has the reference's keys, order, shapes and dtypes. The buffer values
are computed as the reference computes them."""
import pytest
import torch
import torch.nn as tnn
from safetensors.torch import save_file

from mim import tree
from mim.checkpoints import moby as ckpt
from mim.checkpoints import swin as swin_ckpt
from mim.models import moby, swin

import test_moby as tm


# ----------------------------------------------------------------------------------------
# The reference's module layout, re-stated (no forward).


class Attn(tnn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.relative_position_bias_table = tnn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        c = torch.stack(torch.meshgrid([torch.arange(window), torch.arange(window)], indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window - 1
        rel[:, :, 1] += window - 1
        rel[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Linear(dim, dim)


class Block(tnn.Module):
    def __init__(self, dim, res, heads, window, shift):
        super().__init__()
        if res <= window:
            window, shift = res, 0
        self.norm1 = tnn.LayerNorm(dim)
        self.attn = Attn(dim, window, heads)
        self.norm2 = tnn.LayerNorm(dim)
        self.mlp = tnn.Module()
        self.mlp.fc1, self.mlp.fc2 = tnn.Linear(dim, 4 * dim), tnn.Linear(4 * dim, dim)
        mask = None
        if shift:
            img = torch.zeros(1, res, res, 1)
            cnt = 0
            for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                    img[:, h, w, :] = cnt
                    cnt += 1
            win = img.view(1, res // window, window, res // window, window, 1).permute(0, 1, 3, 2, 4, 5)
            win = win.reshape(-1, window * window)
            mask = win.unsqueeze(1) - win.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        self.register_buffer("attn_mask", mask)


class Swin(tnn.Module):
    def __init__(self, e):
        super().__init__()
        self.patch_embed = tnn.Module()
        self.patch_embed.proj = tnn.Conv2d(3, e.embed_dim, e.patch_size, e.patch_size)
        self.patch_embed.norm = tnn.LayerNorm(e.embed_dim)
        self.layers = tnn.ModuleList()
        res = e.img_size // e.patch_size
        for i, (depth, heads) in enumerate(zip(e.depths, e.num_heads)):
            dim = e.embed_dim * 2 ** i
            layer = tnn.Module()
            layer.blocks = tnn.ModuleList([Block(dim, res >> i, heads, e.window_size,
                                                 0 if j % 2 == 0 else e.window_size // 2)
                                           for j in range(depth)])
            if i < len(e.depths) - 1:
                layer.downsample = tnn.Module()
                layer.downsample.reduction = tnn.Linear(4 * dim, 2 * dim, bias=False)
                layer.downsample.norm = tnn.LayerNorm(4 * dim)
            self.layers.append(layer)
        self.norm = tnn.LayerNorm(e.embed_dim * 2 ** (len(e.depths) - 1))


class MoBYLayout(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.encoder_k = Swin(cfg.encoder), Swin(cfg.encoder)
        nf, h, o = swin.num_features(cfg.encoder), cfg.mlp_hidden_dim, cfg.mlp_out_dim
        self.projector = tm.RefMLP(nf, h, o, cfg.proj_num_layers)
        self.projector_k = tm.RefMLP(nf, h, o, cfg.proj_num_layers)
        self.predictor = tm.RefMLP(o, h, o, cfg.pred_num_layers)
        self.register_buffer("queue1", torch.randn(o, cfg.contrast_num_negative))
        self.register_buffer("queue2", torch.randn(o, cfg.contrast_num_negative))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def meta(t):
    return tree.map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), t)


# ----------------------------------------------------------------------------------------


def test_full_size_layout_is_the_references():
    """Swin-T MoBY at 224 px (the recipe's): keys in order, shapes, dtypes, and the buffer
    values, against the re-stated reference layout."""
    cfg = moby.config()
    with torch.device("meta"):
        ref = MoBYLayout(cfg)
    params, state = ckpt.expected(cfg)
    sd = ckpt.export_official(meta(params), meta(state), cfg)
    want = ref.state_dict()
    assert list(sd) == list(want)
    assert len(sd) == 406
    for k, v in want.items():
        assert sd[k].shape == v.shape and sd[k].dtype == v.dtype, k
    # buffer values (computed on the CPU: meta tensors hold none)
    # 14x14 (shifted) then 7x7 (window clipped to the map: no shift, no mask)
    small = moby.config(encoder=dict(img_size=56, window_size=7, embed_dim=16, depths=(2, 2),
                                     num_heads=(1, 2)), mlp_hidden_dim=32, mlp_out_dim=8,
                        contrast_num_negative=16)
    ref = MoBYLayout(small)
    p, s = moby.init(torch.Generator().manual_seed(0), small)
    sd = ckpt.export_official(p, s, small)
    for k, v in ref.state_dict().items():
        if k.endswith(("relative_position_index", "attn_mask")):
            assert torch.equal(sd[k], v), k
    assert "encoder.layers.0.blocks.1.attn_mask" in sd and "encoder_k.layers.1.blocks.1.attn_mask" not in sd


def test_round_trip_through_a_reference_file(tmp_path):
    cfg = tm.tiny_cfg()
    params, state = tm.perturbed_state(cfg, 0, ptr=24)
    sd = ckpt.export_official(params, state, cfg)
    ref = MoBYLayout(cfg)
    ref.load_state_dict(sd, strict=True)
    path = tmp_path / "ckpt_epoch_9.pth"
    torch.save({"model": ref.state_dict(), "epoch": 9, "max_accuracy": 0.0}, path)
    p2, s2 = ckpt.load_official(path, cfg)
    assert tree.structure_equal(p2, params) and tree.structure_equal(s2, state)
    for a, b in zip(tree.leaves(p2) + tree.leaves(s2), tree.leaves(params) + tree.leaves(state)):
        assert torch.equal(a, b) and a.dtype == b.dtype
    back = ckpt.export_official(p2, s2, cfg)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_imported_checkpoint_reproduces_the_reference_step():
    """An official-layout dict imported by mim gives the re-stated reference's loss, keys,
    momentum-updated momentum branch, queues and BatchNorm statistics."""
    cfg = tm.tiny_cfg()
    params, state = tm.perturbed_state(cfg, 4, ptr=8)
    params, state = ckpt.load_official({"model": ckpt.export_official(params, state, cfg)}, cfg)
    ref = tm.RefMoBY(cfg, 30, 11)
    tm.load_reference(ref, params, state)
    ref.train()
    im_1, im_2 = tm.images(cfg, 4, 5)
    ref_loss = ref(im_1, im_2)
    moby.momentum_update_(params, state, moby.momentum(torch.tensor(11), 30, 0.99))
    loss, (new, aux) = moby.forward(params, state, im_1, im_2, cfg)
    tm.assert_close(loss, ref_loss.detach(), "loss")
    tm.assert_close(aux["key_2"], ref.keys[1], "key_2")
    tm.assert_close(new["queue2"], ref.queue2, "queue2")
    assert torch.equal(new["queue_ptr"], ref.queue_ptr)
    ref_sd = ref.state_dict()
    for k, v in tree.flatten(new["projector_k"]).items():
        tm.assert_close(v, ref_sd["projector_k." + k], k)
    for k, v in tree.flatten(new["predictor"]).items():
        tm.assert_close(v.float(), ref_sd["predictor." + k].float(), k)


def test_mim_checkpoint_exports_to_the_reference(tmp_path):
    """A mim moby_pretrain checkpoint (params.* and model_state.* in safetensors) reads
    back through the same importer."""
    cfg = tm.tiny_cfg()
    params, state = tm.perturbed_state(cfg, 1)
    flat = {"params." + k: v.contiguous() for k, v in tree.flatten(params).items()}
    flat.update({"model_state." + k: v.contiguous() for k, v in tree.flatten(state).items()})
    save_file(flat, str(tmp_path / "state.safetensors"))
    p2, s2 = ckpt.load_official(tmp_path / "state.safetensors", cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(s2), tree.leaves(state)))
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(p2), tree.leaves(params)))


def test_online_encoder_starts_swin_finetuning(tmp_path):
    """The exported backbone, and a whole reference MoBY checkpoint, load through
    ``init.format='swin'`` (``mim.checkpoints.swin.load_for_finetune``) into a Swin with a
    fresh head; the momentum encoder is not what loads."""
    cfg = tm.tiny_cfg()
    params, state = tm.perturbed_state(cfg, 2)
    backbone = ckpt.encoder_state_dict(params, cfg)
    assert not any(k.startswith("head.") for k in backbone)
    assert "layers.0.blocks.0.attn.relative_position_index" in backbone
    fine_cfg = swin.config(**{**cfg.encoder.to_dict(), "num_classes": 7})
    fresh = swin.init(torch.Generator().manual_seed(9), fine_cfg)
    for name, sd in (("backbone.pth", backbone),
                     ("moby.pth", {"model": ckpt.export_official(params, state, cfg)})):
        torch.save(sd, tmp_path / name)
        loaded = swin_ckpt.load_for_finetune(fresh, tmp_path / name, fine_cfg)
        flat, enc = tree.flatten(loaded), tree.flatten(params["encoder"])
        assert all(torch.equal(flat[k], v) for k, v in enc.items()), name
        assert torch.equal(flat["head.weight"], fresh["head"]["weight"])


def test_linear_evaluation_checkpoint_loads(tmp_path):
    """moby_linear.py saves a SwinTransformer with its head (buffers included)."""
    cfg = tm.tiny_cfg()
    lin_cfg = swin.config(**{**cfg.encoder.to_dict(), "num_classes": 10})
    with torch.device("meta"):
        layout = Swin(lin_cfg)
        layout.head = tnn.Linear(swin.num_features(lin_cfg), 10)
    p = swin.init(torch.Generator().manual_seed(3), lin_cfg)
    sd = swin_ckpt.export_official(p, lin_cfg)
    assert list(sd) == list(layout.state_dict())
    torch.save({"model": sd, "epoch": 99, "max_accuracy": 70.9}, tmp_path / "linear.pth")
    back = ckpt.load_linear(tmp_path / "linear.pth", lin_cfg)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(p)))


def test_mismatched_config_is_named():
    cfg = tm.tiny_cfg()
    params, state = moby.init(torch.Generator().manual_seed(0), cfg)
    sd = ckpt.export_official(params, state, cfg)
    with pytest.raises(ValueError, match=r"shape mismatches \['projector.linear_hidden.1.weight"):
        ckpt.load_official(sd, tm.tiny_cfg(mlp_hidden_dim=32))
    with pytest.raises(ValueError, match="missing keys.*predictor.linear_hidden.4.weight"):
        ckpt.load_official(sd, tm.tiny_cfg(pred_num_layers=3))
    with pytest.raises(ValueError, match="queue1"):
        ckpt.load_official({k: v for k, v in sd.items() if k.startswith("encoder.")}, cfg)
