"""The BEiT task and experiments: the task's loss and masked-token accuracy against the
reference's engine_for_pretraining.py step (the nn.Module re-statement of
VisionTransformerForMaskedImageModeling in tests/beit_reference.py and OpenAI's dall_e
Encoder), config refusals, each experiment's :tiny for a few steps (fine-tuning and linear
probing started from a tiny pretraining run through init.format="beit"), and a short
learning check with the :tiny k-means tokenizer."""
import json

import pytest
import torch

from conftest import experiment, few_steps
from mim import backend as backend_lib
from mim import tree
from mim.checkpoints import beit as beit_ckpt
from mim.config import ConfigError
from mim.data import pipeline
from mim.models import dalle, tokenizers
from mim.tasks import beit_pretrain as task
from mim.train import frozen as frozen_lib
from mim.train import loop

import beit_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(dalle_tokenizer=True, **kw):
    """The :tiny encoder, narrower; with the DALL-E tokenizer of the :tiny size (a random
    one: the reference's step reads it) unless ``dalle_tokenizer=False`` (:tiny's k-means)."""
    c = experiment("beit_base", "tiny")
    c.model.update(embed_dim=64, depth=2, num_heads=4)
    if dalle_tokenizer:
        c.tokenizer = tokenizers.config("dalle", image_size=64, n_hid=16, n_blk_per_group=1,
                                        vocab_size=512)
        c.model.vocab_size = 512
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_loss_and_accuracy_match_the_reference_step():
    """engine_for_pretraining.py: labels = d_vae ids at bool_masked_pos, CrossEntropyLoss of
    model(samples, bool_masked_pos), mlm_acc = mean(argmax == labels)."""
    dall_e = pytest.importorskip("dall_e")
    c = small_config()
    params, _ = task.init(c, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    params = tree.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=gen), params)
    tok = tokenizers.init(torch.Generator().manual_seed(2), c.tokenizer)
    enc = dall_e.Encoder(n_hid=c.tokenizer.model.n_hid, n_blk_per_group=c.tokenizer.model.n_blk_per_group,
                         vocab_size=c.tokenizer.model.vocab_size, requires_grad=False)
    enc.load_state_dict(tree.flatten(tok))
    m = c.model
    model = ref.ForMaskedImageModeling(m.img_size, m.patch_size, m.vocab_size, m.embed_dim, m.depth,
                                       m.num_heads, init_values=m.layer_scale_init)
    model.load_state_dict(beit_ckpt.export_official(params, m))
    model.eval()
    B = 6
    images = torch.randn(B, 3, 32, 32, generator=gen)
    pixels = torch.rand(B, 3, 64, 64, generator=gen)
    mask = torch.stack([task.batch_extras(torch.Generator().manual_seed(10 + i), c)["mask"] for i in range(B)])
    assert mask.shape == (B, 8, 8) and 0 < mask.sum() <= B * 25
    bool_masked_pos = mask.flatten(1).bool()
    with torch.no_grad():
        labels = torch.argmax(enc(dall_e.map_pixels(pixels)), axis=1).flatten(1)[bool_masked_pos]
        outputs = model(images, bool_masked_pos)
        want = torch.nn.CrossEntropyLoss()(outputs, labels)
        want_acc = (outputs.max(-1)[1] == labels).float().mean()
    batch = {"image": images, "tokenizer_image": dalle.map_pixels(pixels), "mask": mask}
    value, (_, metrics) = task.loss(params, {}, batch, c, False, {"tokenizer": tok})
    assert abs(value.item() - want.item()) < 1e-5, (value.item(), want.item())
    assert abs(metrics["mlm_acc"].item() - want_acc.item()) < 1e-6
    sums = task.evaluate(params, {}, batch, c, {"tokenizer": tok})
    out = task.summarize(sums)
    assert abs(out["loss"] - want.item()) < 1e-5 and sums["masked_tokens"] == bool_masked_pos.sum()


def test_image_keys_and_views():
    c = small_config()
    keys = task.image_keys(c)
    assert keys["image"].size == 32 and keys["tokenizer_image"].size == 64
    assert keys["tokenizer_image"].mean == (-0.125,) * 3 and keys["tokenizer_image"].std == (1.25,) * 3
    from PIL import Image
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    views = task.train_transform(c)(img)
    assert views["image"].shape == (3, 32, 32) and views["tokenizer_image"].shape == (3, 64, 64)
    # A flat colour c maps to 0.8 c + 0.1 in the tokenizer view (colour jitter moves c).
    ev = task.eval_transform(c)(img)
    torch.testing.assert_close(ev["tokenizer_image"][:, 5, 5], dalle.map_pixels(torch.tensor([200, 100, 50]) / 255.0),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("mask.num_masking_patches", 1, "unilm issue 551"),
    ("tokenizer.image_size", 32, "patch grid"),
    ("model.vocab_size", 256, "vocab_size"),
    ("model.img_size", 64, "img_size"),
])
def test_config_refusals(field, value, match):
    c = small_config(**{field: value})
    with pytest.raises(ConfigError, match=match):
        task.init(c, torch.Generator())


def test_tokenizer_is_loaded_from_its_file(tmp_path):
    """config.tokenizer.weights: a safetensors state dict in the official layout."""
    import safetensors.torch
    c = small_config()
    tok = tokenizers.init(torch.Generator().manual_seed(4), c.tokenizer)
    path = tmp_path / "dalle_encoder.safetensors"
    safetensors.torch.save_file(tree.flatten(tok), str(path))
    c.tokenizer.weights = str(path)
    spec = task.frozen_networks(c)["tokenizer"]
    loaded = spec.load(spec.weights, None)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(loaded), tree.leaves(tok)))
    c.tokenizer.model.vocab_size = 1024
    with pytest.raises(ValueError, match="shapes differ"):
        task.frozen_networks(c)["tokenizer"].load(str(path), None)


# ------------------------------------------------------------------------------ experiments


def test_tiny_pretrain_then_finetune_and_linprobe(small_data, tmp_path):
    """Three steps of each :tiny, the fine-tuning and the per-block linear probe started
    from the pretraining run's workdir (init.format="beit")."""
    pre = tmp_path / "pre"
    s = loop.train(few_steps("beit_base", small_data), str(pre))
    assert s["steps"] == 3 and s["final_loss"] == s["final_loss"] and 0 <= s["eval_mlm_acc"] <= 1
    for name in ("beit_base_finetune", "beit_base_linprobe"):
        c = few_steps(name, small_data, **{"init.checkpoint": str(pre)})
        assert c.init.format == "beit"
        out = loop.train(c, str(tmp_path / name))
        assert out["steps"] == 3 and out["final_loss"] == out["final_loss"]
        assert out["eval_count"] == 20
        if name == "beit_base_linprobe":
            assert "eval_best_block" in out and 0 <= out["eval_best_block"] < 4
    assert experiment("beit_base_finetune", "start=pretrain").optim.layer_decay == 0.65


@pytest.mark.slow
def test_learning_with_the_kmeans_tokenizer(small_data, tmp_path):
    """Tiny pretraining with the :tiny tokenizer (here a 16-centroid patch k-means codebook
    fitted on the run's first crops): the loss falls from ln(16) ~ 2.77, and the
    masked-token accuracy on centre crops is well above that of always answering their
    most frequent token (counted here from the tokenizer's own ids): the model predicts
    masked patches from their context, not only the token distribution. docs/results.md
    has the :tiny figures on the validation split."""
    c = small_config(dalle_tokenizer=False, **{
        "data.path": small_data, "steps": 100, "batch_size": 32, "eval_batch_size": 40,
        "log_every": 5, "eval_every": 100, "checkpoint_every": 100, "data.num_workers": 0,
        "optim.warmup_steps": 5, "optim.lr": 3e-3, "tokenizer.model.vocab_size": 16,
        "model.vocab_size": 16, "tokenizer.model.fit_images": 256,
        # the 120 training images, centre-cropped with fixed masks: 3,000 masked tokens
        "data.eval_split": "train"})
    assert c.tokenizer.name == "kmeans"
    out = loop.train(c, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    be = backend_lib.setup("cpu")
    nets, rec = frozen_lib.load(task, c, be, str(tmp_path))
    assert rec["tokenizer"]["weights"] == str(tmp_path / "frozen" / "tokenizer.safetensors")
    loader, _ = pipeline.eval_loader(c, be, task)
    labels = []
    for batch in loader:
        batch = pipeline.to_device(batch, be.device, c.data, train=False, views=task.image_keys(c, False))
        ids = tokenizers.token_ids(nets["tokenizer"], batch["tokenizer_image"], c.tokenizer)
        labels.append(ids[batch["mask"].flatten(1).bool()])
    labels = torch.cat(labels)
    majority = torch.bincount(labels).max().item() / labels.numel()
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}; eval mlm_acc {out['eval_mlm_acc']:.3f}, "
          f"majority token {majority:.3f}")
    assert abs(out["eval_majority_acc"] - majority) < 1e-9
    assert losses[0] > 2.5 and losses[-1] < losses[0] - 0.3
    assert out["eval_mlm_acc"] > majority + 0.05
