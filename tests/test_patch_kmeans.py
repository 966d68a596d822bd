"""The patch k-means tokenizer (mim.models.patch_kmeans): its features against a loop over
patches, its ids against a brute-force nearest centroid, the fit against known cluster
centres and Lloyd's fixed point, its codebook file's refusals, and the run's handling of a
fitted frozen network: fitted once, saved beside the run with its SHA-256, read back on
resume, a changed file refused."""
import hashlib

import pytest
import safetensors.torch
import torch

from conftest import experiment
from mim import backend as backend_lib
from mim.checkpoints import patch_kmeans as ckpt
from mim.models import patch_kmeans, tokenizers
from mim.tasks import beit_pretrain as task
from mim.train import frozen as frozen_lib

pytestmark = pytest.mark.usefixtures("one_thread")


def test_features_are_pooled_patches():
    cfg = patch_kmeans.config(vocab_size=4, pool=2)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    f = patch_kmeans.features(x, cfg)
    assert f.shape == (2, 2, 3, 12)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
                want = [patch[c, 4 * u:4 * u + 4, 4 * v:4 * v + 4].mean()
                        for u in range(2) for v in range(2) for c in range(3)]
                torch.testing.assert_close(f[b, i, j], torch.stack(want), rtol=0, atol=1e-6)


def test_normalized_features_are_mae_normalised_pixels():
    """``normalize=True``: each token's ``3 pool^2`` numbers standardised as MAE's
    norm_pix_loss (models_mae.py: unbiased variance, ``(var + 1e-6) ** .5``), computed here
    per patch by hand; a patch and its brightened, contrast-scaled copy get the same
    features (the colour is gone, the pattern stays)."""
    cfg = patch_kmeans.config(vocab_size=4, pool=2, normalize=True)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    f = patch_kmeans.features(x, cfg)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = x[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
                raw = [float(patch[c, 4 * u:4 * u + 4, 4 * v:4 * v + 4].mean())
                       for u in range(2) for v in range(2) for c in range(3)]
                mean = sum(raw) / 12
                var = sum((r - mean) ** 2 for r in raw) / 11
                want = torch.tensor([(r - mean) / (var + 1e-6) ** 0.5 for r in raw])
                torch.testing.assert_close(f[b, i, j], want, rtol=0, atol=1e-4)
    torch.testing.assert_close(patch_kmeans.features(0.2 + 0.5 * x, cfg), f, rtol=0, atol=5e-3)
    assert not torch.allclose(patch_kmeans.features(x, patch_kmeans.config(pool=2)), f)


def test_ids_are_the_nearest_centroid():
    c = tokenizers.config("kmeans", image_size=32, vocab_size=16, pool=2)
    params = tokenizers.init(torch.Generator().manual_seed(1), c)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = tokenizers.token_ids(params, x, c)
    f = patch_kmeans.features(x, c.model).reshape(-1, 12)
    want = torch.cdist(f.double(), params["codebook"].double()).argmin(1)
    assert ids.shape == (3, 16) and torch.equal(ids.flatten(), want)


def _clustered(k=5, per=60, seed=3):
    """Images whose 8x8 patches are flat colours drawn around k known colours."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(k, 3, generator=gen)
    labels = torch.arange(k).repeat_interleave(per)
    colours = centres[labels] + 0.01 * torch.randn(k * per, 3, generator=gen)
    # one patch per colour: (N, 3, 8, 8) images of one token each
    return colours[:, :, None, None].expand(-1, -1, 8, 8).contiguous(), centres


def test_fit_recovers_known_centres_and_is_a_fixed_point():
    images, centres = _clustered()
    cfg = patch_kmeans.config(vocab_size=5, pool=1, fit_iters=20)
    cb = patch_kmeans.fit(images, cfg, torch.Generator().manual_seed(0))["codebook"]
    # each true centre has one centroid within the noise
    assert torch.cdist(centres, cb).min(1).values.max() < 0.01
    # Lloyd's fixed point: each centroid is the mean of the features nearest to it
    f = patch_kmeans.features(images, cfg).reshape(-1, 3)
    near = torch.cdist(f, cb).argmin(1)
    for j in range(5):
        torch.testing.assert_close(cb[j], f[near == j].mean(0), rtol=0, atol=1e-5)
    again = patch_kmeans.fit(images, cfg, torch.Generator().manual_seed(0))["codebook"]
    assert torch.equal(cb, again)


def test_fit_needs_enough_patches():
    images, _ = _clustered(k=2, per=2)
    with pytest.raises(ValueError, match="4 patches for 8 centroids"):
        patch_kmeans.fit(images, patch_kmeans.config(vocab_size=8, pool=1), torch.Generator())


def test_codebook_file_refusals(tmp_path):
    cfg = patch_kmeans.config(vocab_size=8, pool=2)
    good = tmp_path / "cb.safetensors"
    safetensors.torch.save_file({"codebook": torch.rand(8, 12)}, str(good))
    assert ckpt.load(str(good), cfg)["codebook"].shape == (8, 12)
    with pytest.raises(ValueError, match=r"needs \(16, 12\)"):
        ckpt.load(str(good), patch_kmeans.config(vocab_size=16, pool=2))
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"weight": torch.rand(8, 12)}, str(other))
    with pytest.raises(ValueError, match="one tensor 'codebook'"):
        ckpt.load(str(other), cfg)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors codebook"):
        ckpt.load(str(junk), cfg)
    with pytest.raises(ValueError, match="pool=3 must divide 8"):
        patch_kmeans.config(pool=3)


def test_a_run_fits_once_saves_beside_itself_and_reads_it_back(small_data, tmp_path, monkeypatch):
    c = experiment("beit_base", "tiny", **{"data.path": small_data, "data.num_workers": 0,
                                           "batch_size": 32, "tokenizer.model.fit_images": 64})
    be = backend_lib.setup("cpu")
    nets, rec = frozen_lib.load(task, c, be, str(tmp_path))
    path = tmp_path / "frozen" / "tokenizer.safetensors"
    assert rec["tokenizer"]["weights"] == str(path)
    assert rec["tokenizer"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # fitted on the first 64 training crops' tokenizer views, from the recorded seed
    images = frozen_lib.fit_images(task, c, "tokenizer_image", 64)
    assert images.shape == (64, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    want = patch_kmeans.fit(images, c.tokenizer.model,
                            torch.Generator().manual_seed(rec["tokenizer"]["fitted_seed"]))
    assert torch.equal(nets["tokenizer"]["codebook"], want["codebook"])
    # resuming reads the saved file: no second fit
    monkeypatch.setattr(patch_kmeans, "fit", lambda *a, **k: pytest.fail("fitted twice"))
    nets2, rec2 = frozen_lib.load(task, c, be, str(tmp_path))
    assert rec2 == rec and torch.equal(nets2["tokenizer"]["codebook"], nets["tokenizer"]["codebook"])
    # a file changed since the checkpoint was written is refused on resume
    safetensors.torch.save_file({"codebook": torch.rand(64, 12)}, str(path))
    _, rec3 = frozen_lib.load(task, c, be, str(tmp_path))
    with pytest.raises(frozen_lib.FrozenNetworkError, match="frozen network 'tokenizer'"):
        frozen_lib.check_resume(rec, rec3, str(tmp_path))
