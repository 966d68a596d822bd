"""mim.embed: pooled features of a folder of images from a supervised ViT run and from an
MAE pretraining run, against timm's VisionTransformer carrying the same weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from PIL import Image
from torchvision import transforms as tv

from conftest import ROOT, few_steps
from mim import embed
from mim.checkpoints import weights
from mim.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_inputs(root, paths, mean, std):
    """The eval transform of the :tiny configs (32-px images, crop_pct 1: resize to 32,
    centre crop 32), written with torchvision."""
    t = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(32),
                    tv.ToTensor(), tv.Normalize(mean, std)])
    return torch.stack([t(Image.open(os.path.join(root, p)).convert("RGB")) for p in paths])


def timm_encoder(workdir, global_pool, num_classes):
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=num_classes,
        global_pool=global_pool).eval()
    sd = weights.read_source(workdir)
    missing, _ = m.load_state_dict({k: v for k, v in sd.items() if k in m.state_dict()}, strict=False)
    assert set(missing) <= {"head.weight", "head.bias"}
    return m


def test_vit_run_features_safetensors(tmp_path, small_data):
    run = str(tmp_path / "vit")
    c = few_steps("vit_b32", small_data, batch_size=16)
    loop.train(c, run)
    val = os.path.join(small_data, "val")
    out = str(tmp_path / "f.safetensors")
    r = embed.embed(run, val, out, batch_size=7)
    loaded = safetensors.torch.load_file(out)
    with safetensors.safe_open(out, "pt") as f:
        meta = f.metadata()
    paths, classes = json.loads(meta["paths"]), json.loads(meta["classes"])
    assert classes == sorted(os.listdir(val)) and len(paths) == 20
    assert loaded["labels"].tolist() == [classes.index(p.split(os.sep)[0]) for p in paths]
    assert loaded["features"].shape == (20, 128) and torch.equal(loaded["features"], r["features"])
    m = timm_encoder(run, "token", 10)
    x = reference_inputs(val, paths, c.data.mean, c.data.std)
    with torch.no_grad():
        want = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(loaded["features"], want, atol=1e-5, rtol=1e-5)


def test_mae_run_features_npy_cli(tmp_path, small_data):
    run = str(tmp_path / "mae")
    c = few_steps("mae_base", small_data, batch_size=16, **{"recon.every": 0})
    loop.train(c, run)
    images = os.path.join(small_data, "val", "cat")      # no class folders: labels -1
    out = str(tmp_path / "f.npy")
    r = subprocess.run([sys.executable, "-m", "mim.embed", f"--checkpoint={run}", f"--images={images}",
                        f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 images x 128 features" in r.stdout
    feats = np.load(out)
    side = json.load(open(out + ".json"))
    assert side["labels"] == [-1, -1] and side["classes"] == []
    # MAE's probe feature: the class token after the final norm (main_linprobe.py).
    m = timm_encoder(run, "token", 0)
    x = reference_inputs(images, side["paths"], c.data.mean, c.data.std)
    with torch.no_grad():
        want = m.forward_features(x)[:, 0]
    np.testing.assert_allclose(feats, want.numpy(), atol=1e-5, rtol=1e-5)


def test_bad_inputs(tmp_path, small_data):
    with pytest.raises(FileNotFoundError, match="no images"):
        embed.list_images(str(tmp_path))
    with pytest.raises(ValueError, match="must end in .safetensors or .npy"):
        embed.embed(str(tmp_path), small_data, str(tmp_path / "f.txt"))
    with pytest.raises(ValueError, match="records no run config"):
        embed.embed(str(tmp_path), small_data, str(tmp_path / "f.npy"))
