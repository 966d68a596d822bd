"""mim.models.beit_pretrain against an nn.Module re-statement of the reference's
``VisionTransformerForMaskedImageModeling`` (tests/beit_reference.py) with the same
weights, images and masks, the official DALL-E encoder's token ids for the loss, and the
reference's init, layer ids and weight-decay exemptions."""
import math

import pytest
import torch
import torch.nn.functional as F

from mim import tree
from mim.checkpoints import beit as ckpt
from mim.data import masks
from mim.models import beit_pretrain, dalle, tokenizers
import beit_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def tiny(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, vocab_size=512,
                drop_path_rate=0.0)
    base.update(kw)
    return beit_pretrain.config(**base)


def reference(cfg, params):
    m = ref.ForMaskedImageModeling(
        cfg.img_size, cfg.patch_size, cfg.vocab_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
        init_values=cfg.layer_scale_init, use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias)
    m.load_state_dict(ckpt.export_official(params, cfg), strict=True)
    return m.eval()


def randomise(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tree.map(lambda t: t + 0.2 * torch.randn(t.shape, generator=gen), params)


def block_masks(n, grid, num, seed=0):
    return masks.beit_block_masks(torch.Generator().manual_seed(seed), n, grid,
                                  num_masking_patches=num, min_num_patches=2).flatten(1).bool()


def test_full_size_keys_are_the_official_state_dict():
    """beit_base_patch16_224_8k_vocab as run_beit_pretraining.py builds it: the official
    keys in order (without the index buffer), and export adds the buffer in its place."""
    cfg = beit_pretrain.config()
    with torch.device("meta"):
        want = ref.ForMaskedImageModeling(224, 16, 8192, 768, 12, 12).state_dict()
    ours = ckpt.expected(cfg)
    assert list(ours) == [k for k in want if not k.endswith("relative_position_index")]
    assert all(ours[k].shape == want[k].shape for k in ours)
    assert list(ours)[:4] == ["cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert list(ours)[-2:] == ["lm_head.weight", "lm_head.bias"]
    assert ours["rel_pos_bias.relative_position_bias_table"].shape == (27 * 27 + 3, 12)
    assert not any(".attn.relative_position_bias_table" in k for k in ours)
    assert list(ckpt.export_official(ours, cfg)) == list(want)


@pytest.mark.parametrize("variant", [
    dict(),                                                            # the recipe
    dict(use_abs_pos_emb=True, use_shared_rel_pos_bias=False, layer_scale_init=0.0),
])
def test_masked_logits_match_reference(variant):
    cfg = tiny(**variant)
    params = randomise(beit_pretrain.init(torch.Generator().manual_seed(0), cfg))
    model = reference(cfg, params)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = block_masks(4, 4, 6)
    assert mask.sum() > 0 and (~mask).sum() > 0
    with torch.no_grad():
        want = model(x, mask)
        want_all = model(x, mask, return_all_tokens=True)
    got, aux = beit_pretrain.apply(params, x, mask, cfg)
    assert got.shape == (int(mask.sum()), 512)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| {diff:.2e} (scale {want.abs().max().item():.1f})")
    assert diff < TOL * max(1.0, want.abs().max().item())
    all_tokens, _ = beit_pretrain.apply(params, x, mask.view(4, 4, 4), cfg, return_all_tokens=True)
    torch.testing.assert_close(all_tokens, want_all, rtol=0, atol=TOL * want_all.abs().max().item())
    # Static-shape path: (B, K) slots, masked positions first in order, padding marked.
    padded, aux = beit_pretrain.apply(params, x, mask, cfg, max_masked=6)
    assert padded.shape == (4, 6, 512) and torch.equal(aux["valid"].sum(1), mask.sum(1))
    torch.testing.assert_close(padded[aux["valid"]], got, rtol=0, atol=1e-6)


def test_loss_matches_reference_with_official_tokenizer():
    """engine_for_pretraining.py: ids = d_vae.get_codebook_indices(112-px view).flatten(1),
    labels = ids[bool_masked_pos], CrossEntropyLoss(model(x, mask), labels); the tokenizer
    here is the official dall_e.Encoder with the same random weights."""
    dall_e = pytest.importorskip("dall_e")
    cfg = tiny()
    tok_cfg = tokenizers.config("dalle", image_size=32, n_hid=64, vocab_size=512)
    tok = tokenizers.init(torch.Generator().manual_seed(5), tok_cfg)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512, requires_grad=False).eval()
    enc.load_state_dict(tree.flatten(tok))
    params = randomise(beit_pretrain.init(torch.Generator().manual_seed(0), cfg))
    model = reference(cfg, params)
    gen = torch.Generator().manual_seed(2)
    x, pixels = torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, 3, 32, 32, generator=gen)
    mask = block_masks(4, 4, 6, seed=3)
    with torch.no_grad():
        labels = torch.argmax(enc(dall_e.map_pixels(pixels)), axis=1).flatten(1)[mask]
        want = torch.nn.CrossEntropyLoss()(model(x, mask), labels)
    ids = tokenizers.token_ids(tok, dalle.map_pixels(pixels), tok_cfg)
    logits, aux = beit_pretrain.apply(params, x, mask, cfg, max_masked=6)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.gather(1, beit_pretrain.masked_positions(mask, 6)[0]).flatten(),
                         reduction="none")
    got = (ce * aux["valid"].flatten()).sum() / aux["valid"].sum()
    assert abs(got.item() - want.item()) < TOL, (got.item(), want.item())


def test_init_as_the_reference():
    """trunc_normal_(std=0.02, a=-0.02, b=0.02) for tokens, linears, conv and lm_head; zero
    biases and table; gamma 0.1; fix_init_weight divides block i's attn.proj and mlp.fc2 by
    sqrt(2 (i + 1))."""
    cfg = tiny(depth=3, embed_dim=96, num_heads=4, use_abs_pos_emb=True)
    a = beit_pretrain.init(torch.Generator().manual_seed(0), cfg)
    b = beit_pretrain.init(torch.Generator().manual_seed(0), cfg)
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))
    flat = tree.flatten(a)
    for k in ("cls_token", "mask_token", "pos_embed", "lm_head.weight", "patch_embed.proj.weight",
              "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight"):
        v = flat[k]
        assert v.abs().max() <= 0.02 and v.abs().max() > 0.018, k
        # std of N(0, 0.02) truncated at one sigma: 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
        assert abs(v.std().item() - 0.02 * 0.5396) < 0.15 * 0.02 * 0.5396, k
    for i in range(3):
        s = 0.02 / math.sqrt(2 * (i + 1))
        for k in (f"blocks.{i}.attn.proj.weight", f"blocks.{i}.mlp.fc2.weight"):
            assert s * 0.9 < flat[k].abs().max() <= s + 1e-9, k
        assert torch.all(flat[f"blocks.{i}.gamma_1"] == 0.1)
    for k, v in flat.items():
        if k.endswith((".bias", "relative_position_bias_table", "q_bias", "v_bias")):
            assert not v.any(), k
    assert torch.all(flat["norm.weight"] == 1)


def test_train_mode_drop_path_and_gradients():
    cfg = tiny(drop_path_rate=0.0)
    params = randomise(beit_pretrain.init(torch.Generator().manual_seed(0), cfg))
    x = torch.randn(2, 3, 32, 32)
    mask = block_masks(2, 4, 6)
    eval_out, _ = beit_pretrain.apply(params, x, mask, cfg)
    train_out, _ = beit_pretrain.apply(params, x, mask, cfg, train=True)
    assert torch.equal(eval_out, train_out)                     # no drop path -> same
    grads = torch.func.grad(lambda p: beit_pretrain.apply(p, x, mask, cfg, train=True)[0].square().mean())(params)
    g = tree.flatten(grads)
    assert g["mask_token"].abs().sum() > 0 and g["rel_pos_bias.relative_position_bias_table"].abs().sum() > 0
    assert not g["cls_token"].isnan().any()
    dp = tiny(drop_path_rate=0.5)
    torch.manual_seed(0)
    a, _ = beit_pretrain.apply(params, torch.randn(16, 3, 32, 32), block_masks(16, 4, 6), dp, train=True)
    assert a.isfinite().all()


def test_features_are_the_linear_eval_model_outputs():
    """``features``: per-block outputs (``get_intermediate_layers``) and the normed class
    token, with no patch replaced."""
    cfg = tiny()
    params = randomise(beit_pretrain.init(torch.Generator().manual_seed(0), cfg))
    model = reference(cfg, params)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        model(x, torch.zeros(2, 16, dtype=torch.bool), return_all_tokens=True)
        cls = model.norm(outs[-1])[:, 0]
    for h in hooks:
        h.remove()
    f = beit_pretrain.features(params, x, cfg, blocks=True)
    assert len(f["blocks"]) == 2
    for got, want in zip(f["blocks"], outs):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    torch.testing.assert_close(f["pooled"], cls, rtol=0, atol=TOL)


def reference_layer_id(name, num_max_layer):
    """optim_factory.get_num_layer_for_vit."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_max_layer - 1


def test_parameter_rules_are_the_references():
    import re
    cfg = tiny(depth=3, use_abs_pos_emb=True)
    names = list(tree.flatten(beit_pretrain.init(torch.Generator(), cfg)))
    assert beit_pretrain.num_layers(cfg) == 3
    for n in names:
        assert beit_pretrain.layer_id(n, cfg) == reference_layer_id(n, 3 + 2), n
    # get_parameter_groups: no decay for 1-D tensors, ".bias" and no_weight_decay() names.
    skip = {n for n in names if any(re.search(r, n) for r in beit_pretrain.no_weight_decay(cfg))}
    assert skip == {"pos_embed", "cls_token"}       # mask_token and the table are decayed


def test_bad_masks_and_configs():
    cfg = tiny()
    params = beit_pretrain.init(torch.Generator().manual_seed(0), cfg)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="mask of shape"):
        beit_pretrain.apply(params, x, torch.zeros(2, 9, dtype=torch.bool), cfg)
    with pytest.raises(ValueError, match="max_masked"):
        beit_pretrain.apply(params, x, block_masks(2, 4, 6), cfg, max_masked=17)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=7)
