"""The DALL-E dVAE encoder (mim.models.dalle), the tokenizer interface and the weight files
(mim.checkpoints.dalle), against OpenAI's own ``dall_e.Encoder`` from the ``DALL-E`` package
(pip install DALL-E attrs) on random weights."""
import math

import pytest
import safetensors.torch
import torch

from mim import tree
from mim.checkpoints import dalle as ckpt
from mim.models import dalle, tokenizers

dall_e = pytest.importorskip("dall_e")

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(n_hid=64, vocab_size=512)


def official(cfg, params=None, device="cpu"):
    enc = dall_e.Encoder(n_hid=cfg.n_hid, n_blk_per_group=cfg.n_blk_per_group,
                         input_channels=cfg.input_channels, vocab_size=cfg.vocab_size,
                         requires_grad=False, device=torch.device(device))
    if params is not None:
        enc.load_state_dict(tree.flatten(params), strict=True)
    return enc.eval()


def images(n=3, side=32, seed=1):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_full_size_layout_is_the_official_state_dict():
    """The released encoder's keys, order and shapes (n_hid 256, 2 blocks per group, 8192
    tokens): blocks.input 7x7, id_path only where the width changes, output.conv 1x1."""
    cfg = dalle.config()
    ours = dalle.param_shapes(cfg)
    ref = official(cfg, device="meta").state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k] == ref[k].shape for k in ref)
    assert ref["blocks.input.w"].shape == (256, 3, 7, 7)
    assert ref["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in ours
    assert ours["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert dalle.post_gain(cfg) == 1 / 64 == official(dalle.config(**SMALL)).blocks.group_1.block_1.post_gain


@pytest.mark.parametrize("blocks", [2, 1, 3])
def test_logits_and_token_ids_match_official(blocks):
    cfg = dalle.config(n_blk_per_group=blocks, **SMALL)
    params = dalle.init(torch.Generator().manual_seed(blocks), cfg)
    # Biases are zero at init; move them so a bias slip would show.
    params = tree.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7)), params)
    ref = official(cfg, params)
    x = dall_e.map_pixels(images())
    with torch.no_grad():
        want = ref(x)
    got = dalle.apply(params, x, cfg)
    assert got.shape == (3, 512, 4, 4)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())
    assert torch.equal(dalle.token_ids(params, x, cfg), want.argmax(dim=1))
    assert torch.equal(got.topk(5, dim=1).indices, want.topk(5, dim=1).indices)


def test_init_statistics_match_official_conv():
    """dall_e.utils.Conv2d: weights normal(0, 1/sqrt(n_in k^2)), zero biases."""
    cfg = dalle.config(**SMALL)
    flat = tree.flatten(dalle.init(torch.Generator().manual_seed(0), cfg))
    for k, v in flat.items():
        if k.endswith(".b"):
            assert not v.any(), k
        else:
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            assert abs(v.std().item() * math.sqrt(fan_in) - 1) < 0.1, k
            assert abs(v.mean().item()) < 5 * v.std().item() / math.sqrt(v.numel()), k
    a = dalle.init(torch.Generator().manual_seed(0), cfg)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), flat.values()))


def test_bad_inputs_and_configs():
    cfg = dalle.config(**SMALL)
    p = dalle.init(torch.Generator().manual_seed(0), cfg)
    with pytest.raises(ValueError, match="multiples of 8"):
        dalle.apply(p, torch.rand(1, 3, 20, 20), cfg)
    with pytest.raises(ValueError, match="expected"):
        dalle.apply(p, torch.rand(1, 1, 16, 16), cfg)
    for bad in (dict(n_hid=30), dict(vocab_size=1), dict(n_blk_per_group=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            dalle.config(**bad)


def test_tokenizer_interface_matches_official_pipeline():
    """tokenizers.token_ids on pixels normalised with tokenizers.normalization equals BEiT's
    ``d_vae.get_codebook_indices(map_pixels(x)).flatten(1)`` with the official encoder."""
    cfg = tokenizers.config("dalle", image_size=32, **SMALL)
    params = tokenizers.init(torch.Generator().manual_seed(0), cfg)
    ref = official(cfg.model, params)
    x = images()
    mean, std = tokenizers.normalization(cfg)
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, dall_e.map_pixels(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        want = torch.argmax(ref(dall_e.map_pixels(x)), axis=1).flatten(1)
    ids = tokenizers.token_ids(params, dall_e.map_pixels(x), cfg)
    assert ids.dtype == torch.int64 and ids.shape == (3, 16)
    assert torch.equal(ids, want)
    assert tokenizers.grid_size(cfg) == 4 and tokenizers.vocab_size(cfg) == 512
    # Under autocast the tokenizer still runs in its own dtype.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tokenizers.token_ids(params, dall_e.map_pixels(x), cfg), want)
    other = tokenizers.config()
    other.name = "vqgan"
    with pytest.raises(ValueError, match="tokenizer.name"):
        tokenizers.get(other)
    with pytest.raises(ValueError, match="dtype"):
        tokenizers.config(dtype="bfloat16")
    with pytest.raises(ValueError, match="multiple of 8"):
        tokenizers.config(image_size=100)


def test_float16_mode_casts_like_the_official_cuda_path():
    """``float16``: the official Conv2d on CUDA runs every convolution but the output one in
    half precision. On the CPU, check the casts: the logits are float32 and the ids agree
    with float32 almost everywhere (argmax near-ties may flip)."""
    cfg = dalle.config(**SMALL)
    p = dalle.init(torch.Generator().manual_seed(0), cfg)
    x = dall_e.map_pixels(images(n=1, side=16))
    half = dalle.apply(p, x, cfg, float16=True)
    full = dalle.apply(p, x, cfg)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.7


# --------------------------------------------------------------------------- weight files


def test_load_safetensors_torch_and_prefixed(tmp_path):
    cfg = dalle.config(**SMALL)
    params = dalle.init(torch.Generator().manual_seed(0), cfg)
    flat = tree.flatten(params)
    st = tmp_path / "enc.safetensors"
    safetensors.torch.save_file(flat, str(st))
    pth = tmp_path / "dalle_encoder.pth"
    torch.save({"encoder." + k: v for k, v in flat.items()} | {"decoder.blocks.input.w": torch.zeros(1)}, pth)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": flat}, wrapped)
    for path in (st, pth, wrapped):
        got = ckpt.load(path, cfg)
        assert all(torch.equal(a, b) for a, b in zip(tree.leaves(got), flat.values()))
        assert list(tree.flatten(got)) == list(flat)
    with pytest.raises(ValueError, match="missing"):
        ckpt.load(st, dalle.config(n_hid=64, vocab_size=512, n_blk_per_group=1))
    with pytest.raises(ValueError, match="shapes differ"):
        ckpt.load(st, dalle.config(n_hid=64, vocab_size=1024))
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DALL-E encoder"):
        ckpt.load(tmp_path / "other.pth", cfg)


def test_pickled_encoder_needs_the_trust_flag(tmp_path, capsys):
    """OpenAI's encoder.pkl is a pickled dall_e.Encoder: the loader refuses it (weights_only)
    and says how to convert; the CLI refuses without --trust-pickle and, with it, writes a
    safetensors file that gives the official token ids."""
    cfg = dalle.config(**SMALL)
    ref = official(cfg)
    for p in ref.parameters():
        p.data.add_(0.01 * torch.randn(p.shape))
    pkl = tmp_path / "encoder.pkl"
    torch.save(ref, pkl)
    with pytest.raises(ValueError, match="--trust-pickle"):
        ckpt.load(pkl, cfg)
    out = tmp_path / "enc.safetensors"
    with pytest.raises(PermissionError, match="trust"):
        ckpt.convert_pickle(str(pkl), str(out), trust_pickle=False)
    with pytest.raises(SystemExit) as exit_info:
        ckpt.main([str(pkl), str(out)])
    assert exit_info.value.code == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert ckpt.main(["--trust-pickle", str(pkl), str(out)]) == 0
    params = ckpt.load(out, cfg)
    x = dall_e.map_pixels(images())
    with torch.no_grad():
        want = ref(x).argmax(1)
    assert torch.equal(dalle.token_ids(params, x, cfg), want)
