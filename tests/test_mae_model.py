"""mim.models.mae against an independent reference: an nn.Module that follows
facebookresearch/mae models_mae.py with timm's Block/PatchEmbed, and a numpy version of
util/pos_embed.get_2d_sincos_pos_embed (both in mim.peers, the benchmark's peer)."""
import pytest
import torch

from mim import tree as T
from mim.checkpoints.mae import load_official
from mim.models import mae
from mim.peers import MAE
from mim.peers import sincos_2d_numpy as np_sincos_2d

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0)


# ---------------------------------------------------------------------------------------
# Independent reference.


class RefMAE(MAE):
    """models_mae.MaskedAutoencoderViT semantics (random masking), noise passed in."""

    def randomize(self, seed):
        """Non-trivial values everywhere (biases, norms) so that every parameter matters."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in self.named_parameters():
                if "pos_embed" not in name:
                    t.add_(0.1 * torch.randn(t.shape, generator=g))


def make_reference(seed=0, **overrides):
    torch.manual_seed(seed)
    ref = RefMAE(**{**TINY, **overrides}).eval()
    ref.randomize(seed + 1)
    return ref


# ---------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("dim,grid", [(64, 4), (32, 7), (768, 14), (1280, 16)])
def test_sincos_matches_numpy_reference(dim, grid):
    for cls in (True, False):
        want = torch.from_numpy(np_sincos_2d(dim, grid, cls)).float()
        got = mae.sincos_2d(dim, grid, cls_token=cls)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_config_sizes():
    assert mae.config(**mae.SIZES["huge"]).patch_size == 14
    assert mae.config(**mae.SIZES["large"]).embed_dim == 1024
    c = mae.config()
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.mask_ratio) == (512, 8, 16, 0.75)
    with pytest.raises(ValueError, match="patch_size"):
        mae.config(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.config(mask_ratio=1.0)


def test_init_layout_and_values():
    cfg = mae.config(**TINY)
    params = mae.init(torch.Generator().manual_seed(0), cfg)
    flat = T.flatten(params)
    ref = RefMAE(**TINY).state_dict()
    assert list(flat) == list(ref)
    assert all(flat[k].shape == ref[k].shape for k in ref)
    for name in mae.FROZEN:
        torch.testing.assert_close(flat[name], ref[name])
    # Reference initialisation: xavier-uniform linears (patch embedding as a linear over
    # C*p*p inputs), zero biases, unit layer norms, normal(0.02) tokens.
    for k, v in flat.items():
        if k.endswith("bias"):
            assert torch.all(v == 0), k
        if "norm" in k and k.endswith("weight"):
            assert torch.all(v == 1), k
    w = flat["patch_embed.proj.weight"]
    bound = (6 / (64 + 3 * 8 * 8)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    qkv = flat["blocks.0.attn.qkv.weight"]
    assert qkv.abs().max() <= (6 / (64 + 192)) ** 0.5
    assert 0.01 < flat["cls_token"].std() < 0.03
    again = T.flatten(mae.init(torch.Generator().manual_seed(0), cfg))
    assert all(torch.equal(again[k], flat[k]) for k in flat)


def test_patchify_roundtrip_and_order():
    imgs = torch.randn(2, 3, 32, 24)
    x = mae.patchify(imgs, 8)
    assert x.shape == (2, 12, 192)
    # Patch (row 1, column 2), flattened as (p, q, c).
    torch.testing.assert_close(x[0, 1 * 3 + 2], imgs[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))
    assert torch.equal(mae.unpatchify(x, 8, grid=(4, 3)), imgs)
    sq = torch.randn(2, 3, 32, 32)
    assert torch.equal(mae.unpatchify(mae.patchify(sq, 8), 8), sq)
    assert torch.equal(mae.patchify(sq, 8), make_reference().patchify(sq))
    with pytest.raises(ValueError):
        mae.patchify(sq, 5)


def test_random_masking_keeps_len_keep():
    B, L, D, keep = 3, 16, 5, 4
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    kept, mask, ids_restore = mae.random_masking(x, noise, keep)
    assert kept.shape == (B, keep, D)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    # The kept tokens are those with the smallest noise, and exactly the unmasked ones.
    smallest = noise.argsort(1)[:, :keep]
    for b in range(B):
        assert set(smallest[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
        torch.testing.assert_close(kept[b], x[b, smallest[b]])
    assert torch.equal(noise.argsort(1).gather(1, ids_restore), torch.arange(L).expand(B, L))
    with pytest.raises(ValueError, match="noise"):
        mae.random_masking(x, torch.rand(B, L + 1), keep)


def test_noise_helper():
    cfg = mae.config(**TINY)
    a = mae.noise(torch.Generator().manual_seed(3), 5, cfg)
    b = mae.noise(torch.Generator().manual_seed(3), 5, cfg)
    assert a.shape == (5, 16) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() < 1


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_apply_matches_reference(tmp_path, norm_pix_loss):
    ref = make_reference(norm_pix_loss=norm_pix_loss)
    path = tmp_path / "mae.pth"
    torch.save({"model": ref.state_dict()}, path)
    cfg = mae.config(**TINY, norm_pix_loss=norm_pix_loss)
    params = load_official(path, cfg)

    g = torch.Generator().manual_seed(7)
    imgs = torch.randn(3, 3, 32, 32, generator=g)
    noise = mae.noise(g, 3, cfg)
    with torch.no_grad():
        want_loss, want_pred, want_mask, want_latent = ref(imgs, noise)
        loss, aux = mae.apply(params, imgs, noise, cfg)
    assert aux["pred"].shape == (3, 16, 192) and aux["mask"].shape == (3, 16)
    assert aux["latent"].shape == (3, 1 + mae.len_keep(cfg), 64)
    assert torch.equal(aux["mask"], want_mask)
    assert (aux["pred"] - want_pred).abs().max() < 1e-5
    assert (aux["latent"] - want_latent).abs().max() < 1e-5
    assert abs(loss.item() - want_loss.item()) < 1e-5


def test_loss_counts_only_removed_patches():
    imgs = torch.randn(2, 3, 16, 16)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred = torch.randn(2, 4, 192)
    base = mae.loss(imgs, pred, mask, norm_pix_loss=True)
    noisy = pred + 5 * (1 - mask)[..., None]
    torch.testing.assert_close(mae.loss(imgs, noisy, mask, norm_pix_loss=True), base)
    # Perfect prediction of the normalised target gives zero loss.
    target = mae.target(imgs, 8, norm_pix_loss=True)
    assert mae.loss(imgs, target, mask, norm_pix_loss=True).item() < 1e-10
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_gradients_through_apply():
    cfg = mae.config(**TINY, norm_pix_loss=True)
    params = mae.init(torch.Generator().manual_seed(0), cfg)
    imgs = torch.randn(2, 3, 32, 32)
    noise = mae.noise(torch.Generator().manual_seed(1), 2, cfg)

    grads, loss = torch.func.grad_and_value(lambda p: mae.apply(p, imgs, noise, cfg)[0])(params)
    assert torch.isfinite(loss)
    flat = T.flatten(grads)
    assert set(mae.FROZEN) <= set(flat)
    assert flat["mask_token"].abs().sum() > 0 and flat["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_apply_traces_as_one_graph():
    """Masking by sort and gather needs no host synchronisation, so the whole forward
    traces without graph breaks (what a compiled train step needs)."""
    cfg = mae.config(**TINY, norm_pix_loss=True)
    params = mae.init(torch.Generator().manual_seed(0), cfg)
    imgs = torch.randn(2, 3, 32, 32)
    noise = mae.noise(torch.Generator().manual_seed(1), 2, cfg)
    compiled = torch.compile(lambda p, x, n: mae.apply(p, x, n, cfg)[0], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(params, imgs, noise), mae.apply(params, imgs, noise, cfg)[0])
