"""The official checkpoints of the five references, by name, and their resolution to a
verified file in the local cache (:func:`resolve`).

Every URL below is copied from the reference's own README (or the notebook it links),
never composed by mim; the sources, read for this table:

* MAE: facebookresearch/mae ``README.md`` (pre-trained checkpoints), ``FINETUNE.md``
  (fine-tuned checkpoints, each with the first 6 hex digits of its MD5) and
  ``demo/mae_visualize.ipynb`` (the full pretraining model with its decoder).
* SimMIM: microsoft/SimMIM ``README.md``: Google-Drive pages (a web page, not the file:
  such a file is placed in the cache by hand, see :func:`resolve`).
* BEiT: microsoft/unilm ``beit/README.md`` (GitHub release assets of addf400/files).
* MoBY: SwinTransformer/Transformer-SSL ``README.md``. Its table links the GitHub assets
  crosswise (the DeiT-S row links ``moby_swin_t_300ep_*.pth``, the Swin-T row
  ``moby_deit_small_300ep_*.pth``); the file names and the Google-Drive links of its
  "Updates" section agree with each other, so the ``moby_swin_t_*`` files are the Swin-T
  ones. The 100-epoch Swin-T models are "TBA" there: no URL, no entry.
* DALL-E encoder: openai/DALL-E ``notebooks/usage.ipynb`` (also in BEiT's README, with a
  mirror on conversationhub.blob.core.windows.net).
* timm ViT-B/32: the ``hf_hub_id`` of timm's pretrained configs for
  ``vit_base_patch32_224.<tag>``; the URL is the Hugging Face hub's file address for
  ``model.safetensors`` in that repository (``huggingface_hub.hf_hub_url``).

No publisher states a size or a SHA-256 for these files; MAE states MD5 prefixes, which
are checked. The SHA-256 of each file is recorded in the cache at its first download and
checked from then on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from typing import Dict, Optional, Tuple

from mim.cli import UsageMistake

MAE_README = "facebookresearch/mae README.md"
MAE_FINETUNE = "facebookresearch/mae FINETUNE.md"
MAE_DEMO = "facebookresearch/mae demo/mae_visualize.ipynb"
SIMMIM_README = "microsoft/SimMIM README.md"
BEIT_README = "microsoft/unilm beit/README.md"
MOBY_README = "SwinTransformer/Transformer-SSL README.md"
DALLE_NOTEBOOK = "openai/DALL-E notebooks/usage.ipynb; microsoft/unilm beit/README.md"
TIMM_HUB = "timm pretrained_cfg hf_hub_id (Hugging Face hub)"


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    urls: Tuple[str, ...]          # official addresses, tried in order
    format: str                    # mim.convert / mim.checkpoints format of the file
    experiment: Optional[str]      # experiments/FILE.py[:variant] the weights fit, None if none
    source: str                    # where the URL is published
    size: Optional[int] = None     # bytes, where the publisher states it
    sha256: Optional[str] = None   # where the publisher states it
    md5_prefix: Optional[str] = None  # MAE's READMEs state the first hex digits of the MD5
    note: str = ""

    @property
    def filename(self) -> str:
        if self.format == "timm":
            return self.name + ".safetensors"
        base = self.urls[0].rsplit("/", 1)[-1]
        return base if "." in base else self.name + ".pth"

    @property
    def manual(self) -> bool:
        """True when no URL is a direct file (Google-Drive pages need a browser)."""
        return all("drive.google.com/file/" in u for u in self.urls)


def _mae(name, url, fmt, exp, source, md5, note=""):
    return Release(name, (url,), fmt, exp, source, md5_prefix=md5, note=note)


_MAE = "https://dl.fbaipublicfiles.com/mae/"
_BEIT = "https://github.com/addf400/files/releases/download/v1.0/"
_MOBY = "https://github.com/SwinTransformer/storage/releases/download/v1.0.3/"
_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


def _beit(name, exp, note=""):
    return Release(name, (_BEIT + name + ".pth",), "beit", exp, BEIT_README, note=note)


def _timm(tag, exp, note=""):
    hub = f"vit_base_patch32_224.{tag}"
    return Release(hub, (_HF.format(hub),), "timm", exp, TIMM_HUB, note=note)


_NO_EXP = "no experiment file has this model; override config.model"

RELEASES: Tuple[Release, ...] = (
    # MAE: encoder-only pretrained weights (norm_pix_loss, 1600 epochs) and fine-tuned ViTs.
    _mae("mae_pretrain_vit_base", _MAE + "pretrain/mae_pretrain_vit_base.pth", "mae",
         "experiments/mae_base_finetune.py", MAE_README, "8cad7c"),
    _mae("mae_pretrain_vit_large", _MAE + "pretrain/mae_pretrain_vit_large.pth", "mae",
         "experiments/mae_large_finetune.py", MAE_README, "b8b06e"),
    _mae("mae_pretrain_vit_huge", _MAE + "pretrain/mae_pretrain_vit_huge.pth", "mae",
         None, MAE_README, "9bdbb0", note="ViT-H/14: " + _NO_EXP),
    _mae("mae_finetuned_vit_base", _MAE + "finetune/mae_finetuned_vit_base.pth", "mae_finetune",
         "experiments/mae_base_finetune.py", MAE_FINETUNE, "1b25e9", note="83.664% ImageNet"),
    _mae("mae_finetuned_vit_large", _MAE + "finetune/mae_finetuned_vit_large.pth", "mae_finetune",
         "experiments/mae_large_finetune.py", MAE_FINETUNE, "51f550", note="85.952% ImageNet"),
    _mae("mae_finetuned_vit_huge", _MAE + "finetune/mae_finetuned_vit_huge.pth", "mae_finetune",
         None, MAE_FINETUNE, "2541f2", note="86.928% ImageNet; ViT-H/14: " + _NO_EXP),
    _mae("mae_visualize_vit_large", _MAE + "visualize/mae_visualize_vit_large.pth", "mae",
         "experiments/mae_large.py", MAE_DEMO, None,
         note="full pretraining model with decoder (mim.reconstruct)"),
    # SimMIM (Google-Drive pages; the files pickle a yacs config: re-save their 'model').
    Release("simmim_pretrain__swin_base__img192_window6__100ep",
            (_drive("1Wcbr66JL26FF30Kip9fZa_0lXrDAKP-d"),), "simmim",
            "experiments/simmim_swin_base.py", SIMMIM_README),
    Release("simmim_finetune__swin_base__img192_window6__100ep",
            (_drive("1RsgHfjB4B1ZYblXEQVT-FPX3WSvBrxcs"),), "swin", None, SIMMIM_README,
            note="82.8%; 192 px window 6: " + _NO_EXP),
    Release("simmim_finetune__swin_base__img224_window7__100ep",
            (_drive("1mb43BkW56F5smwiX-g7QUUD7f1Rftq8u"),), "swin",
            "experiments/simmim_swin_base_finetune.py", SIMMIM_README, note="83.5%"),
    Release("simmim_pretrain__swin_base__img192_window6__800ep",
            (_drive("15zENvGjHlM71uKQ3d2FbljWPubtrPtjl"),), "simmim",
            "experiments/simmim_swin_base.py:epochs=800", SIMMIM_README),
    Release("simmim_finetune__swin_base__img224_window7__800ep",
            (_drive("1xEKyfMTsdh6TfnYhk5vbw0Yz7a-viZ0w"),), "swin",
            "experiments/simmim_swin_base_finetune.py", SIMMIM_README, note="84.0%"),
    Release("simmim_pretrain__swin_large__img192_window12__800ep",
            (_drive("1qDxrTl2YUDB0505_4QrU5LU2R1kKmcBP"),), "simmim", None, SIMMIM_README,
            note="Swin-L: " + _NO_EXP),
    Release("simmim_finetune__swin_large__img224_window14__800ep",
            (_drive("1mf0ZpXttEvFsH87Www4oQ-t8Kwr0x485"),), "swin", None, SIMMIM_README,
            note="85.4%; Swin-L: " + _NO_EXP),
    Release("simmim_pretrain__vit_base__img224__800ep",
            (_drive("1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw"),), "simmim",
            "experiments/simmim_vit_base.py", SIMMIM_README),
    Release("simmim_finetune__vit_base__img224__800ep",
            (_drive("1fKgDYd0tRgyHyTnyB1CleYxjo0Gn5tEB"),), "simmim",
            "experiments/simmim_vit_base_finetune.py", SIMMIM_README, note="83.8%"),
    # BEiT: pretrained on ImageNet-22k, then optionally fine-tuned on 22k and 22k -> 1k.
    _beit("beit_base_patch16_224_pt22k", "experiments/beit_base_finetune.py:start=pretrain"),
    _beit("beit_base_patch16_224_pt22k_ft22k", "experiments/beit_base_finetune.py:start=ft22k"),
    _beit("beit_base_patch16_224_pt22k_ft22kto1k", "experiments/beit_base_finetune.py:start=ft22k",
          note="85.2% ImageNet (mode=eval)"),
    _beit("beit_base_patch16_384_pt22k_ft22kto1k", None, note="86.8%; 384 px: " + _NO_EXP),
    _beit("beit_base_patch16_224_pt22k_ft1k", "experiments/beit_base_finetune.py:start=pretrain",
          note="83.7% ImageNet (mode=eval)"),
    _beit("beit_large_patch16_224_pt22k", None, note="BEiT-L: " + _NO_EXP),
    _beit("beit_large_patch16_224_pt22k_ft22k", None, note="BEiT-L: " + _NO_EXP),
    _beit("beit_large_patch16_224_pt22k_ft22kto1k", None, note="87.4%; BEiT-L: " + _NO_EXP),
    _beit("beit_large_patch16_384_pt22k_ft22kto1k", None, note="88.4%; BEiT-L 384 px: " + _NO_EXP),
    _beit("beit_large_patch16_224_pt22k_ft1k", None, note="86.0%; BEiT-L: " + _NO_EXP),
    # MoBY Swin-T, 300 epochs (the 100-epoch models are "TBA" in its README).
    Release("moby_swin_t_300ep_pretrained",
            (_MOBY + "moby_swin_t_300ep_pretrained.pth", _drive("1PS1Q0tAnUfBWLRPxh9iUrinAxeq7Y--u")),
            "moby", "experiments/moby_swin_tiny_linear.py", MOBY_README),
    Release("moby_swin_t_300ep_linear",
            (_MOBY + "moby_swin_t_300ep_linear.pth", _drive("1gbQynZy07uXPO-c0tOLeyG1pQzlnVHx9")),
            "swin", "experiments/moby_swin_tiny_linear.py", MOBY_README,
            note="75.3% ImageNet linear (mode=eval)"),
    # timm ViT-B/32 (experiments/vit_b32.py starts from augreg_in21k).
    _timm("augreg_in21k", "experiments/vit_b32.py", note="21843 classes"),
    _timm("augreg_in21k_ft_in1k", "experiments/vit_b32.py"),
    _timm("augreg_in1k", "experiments/vit_b32.py"),
    _timm("orig_in21k", "experiments/vit_b32.py", note="no head"),
    _timm("sam_in1k", "experiments/vit_b32.py"),
    # OpenAI's DALL-E dVAE encoder: BEiT's tokenizer (config.tokenizer.weights).
    Release("dalle_encoder", ("https://cdn.openai.com/dall-e/encoder.pkl",
                              "https://conversationhub.blob.core.windows.net/beit-share-public/dall-e_vae/encoder.pkl"),
            "dalle", "experiments/beit_base.py", DALLE_NOTEBOOK,
            note="a pickled module: converted only with --trust-pickle"),
)

BY_NAME: Dict[str, Release] = {r.name: r for r in RELEASES}


def get(name: str) -> Optional[Release]:
    """The release called ``name`` (also with a ``.pth`` / ``.safetensors`` suffix, or a
    ``timm/`` prefix), else None."""
    key = name[len("timm/"):] if name.startswith("timm/") else name
    if key in BY_NAME:
        return BY_NAME[key]
    for suffix in (".pth", ".safetensors", ".pkl"):
        if key.endswith(suffix) and key[:-len(suffix)] in BY_NAME:
            return BY_NAME[key[:-len(suffix)]]
    return None


# ----------------------------------------------------------------------------------------
# Cache and download.


class WeightsError(Exception):
    """A release that cannot be made available: one line with the URL, the cache path and
    what went wrong."""


class UnknownName(WeightsError, UsageMistake):
    """Neither a file nor a release name: a command-line mistake (exit status 2)."""


def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("MIM_CACHE") or "~/.cache/mim"))


def cache_path(release: Release) -> str:
    return os.path.join(cache_dir(), release.name, release.filename)


def _record_path(release: Release) -> str:
    return os.path.join(cache_dir(), release.name, "sha256.json")


def _converted_path(release: Release) -> str:
    return os.path.join(cache_dir(), release.name, release.name + ".mim.safetensors")


def _digests(path: str) -> Tuple[str, str, int]:
    sha, md5, n = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
            n += len(block)
    return sha.hexdigest(), md5.hexdigest(), n


def _expected(release: Release) -> Dict[str, object]:
    """What the file must be: the publisher's size / SHA-256, else the SHA-256 recorded at
    its first download."""
    want = {"size": release.size, "sha256": release.sha256}
    rec = _record_path(release)
    if os.path.exists(rec):
        with open(rec) as f:
            saved = json.load(f)
        want["size"] = want["size"] or saved.get("size")
        want["sha256"] = want["sha256"] or saved.get("sha256")
    return want


def _fail(release: Release, url: str, what: str) -> WeightsError:
    return WeightsError(f"{release.name}: {what} (URL {url}; the file can be placed by hand at "
                        f"{cache_path(release)})")


def check(release: Release, path: str) -> str:
    """The file's SHA-256 after checking size, SHA-256 and MD5 prefix against what is
    known; a first check records them (``sha256.json`` beside the file)."""
    sha, md5, size = _digests(path)
    want = _expected(release)
    problems = []
    if want["size"] is not None and size != want["size"]:
        problems.append(f"size {size} bytes, expected {want['size']}")
    if want["sha256"] is not None and sha != want["sha256"]:
        problems.append(f"SHA-256 {sha}, expected {want['sha256']}")
    if release.md5_prefix and not md5.startswith(release.md5_prefix):
        problems.append(f"MD5 {md5[:len(release.md5_prefix)]}..., the publisher states "
                        f"{release.md5_prefix}...")
    if problems:
        raise _fail(release, release.urls[0], f"{path} is not the published file: " + "; ".join(problems))
    if not os.path.exists(_record_path(release)):
        tmp = _record_path(release) + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"sha256": sha, "size": size, "url": release.urls[0]}, f)
        os.replace(tmp, _record_path(release))
    return sha


def _download(release: Release, url: str, dest: str, timeout: float) -> None:
    """``url`` into ``dest``: bytes arrive in ``dest + '.part'`` (a partial one from an
    earlier try is resumed with an HTTP Range request) and the file is renamed into place
    only when complete."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "mim"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if have and r.status != 206:
                have = 0                    # the server ignores Range: start again
            total = r.headers.get("Content-Length")
            total = have + int(total) if total is not None else None
            with open(part, "ab" if have else "wb") as f:
                while True:
                    block = r.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:          # the part is already whole
            total = have
        else:
            raise _fail(release, url, f"download failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException, socket.timeout) as e:
        reason = getattr(e, "reason", None) or e
        got = os.path.getsize(part) if os.path.exists(part) else 0
        raise _fail(release, url, f"download failed after {got} bytes ({reason}); run the same "
                                  f"command again to resume") from e
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise _fail(release, url, f"download incomplete: {got} of {total} bytes; run the same "
                                  f"command again to resume")
    os.replace(part, dest)


def urls(release: Release) -> Tuple[str, ...]:
    """Where ``release`` is fetched from: its official URLs, or with ``MIM_WEIGHTS_MIRROR``
    set (a local or company mirror) ``<mirror>/<file name>`` only."""
    mirror = os.environ.get("MIM_WEIGHTS_MIRROR", "").rstrip("/")
    return (f"{mirror}/{release.filename}",) if mirror else release.urls


def download(release: Release, timeout: float = 60.0) -> str:
    """The verified cached file of ``release``, downloaded (or resumed) when absent."""
    dest = cache_path(release)
    if os.path.exists(dest):
        check(release, dest)
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sources = [u for u in urls(release) if "drive.google.com/file/" not in u]
    if not sources:
        raise _fail(release, release.urls[0], "the publisher's link is a web page (Google Drive), "
                                              "not a file mim can fetch: download it in a browser")
    import fcntl

    # Ranks of one run (or several runs) may ask at once: one downloads, the others wait.
    with open(dest + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(dest):
            errors = []
            for url in sources:
                try:
                    _download(release, url, dest, timeout)
                    break
                except WeightsError as e:
                    errors.append(e)
            else:
                raise errors[0]
            try:
                check(release, dest)
            except WeightsError:
                os.replace(dest, dest + ".corrupt")     # never used; kept for inspection
                raise
            return dest
    check(release, dest)
    return dest


def resolve(name_or_path: str, *, fetch: bool = True) -> str:
    """A path for ``name_or_path``: an existing path is returned unchanged; a release
    name becomes its verified file in the cache (downloaded when ``fetch``; the DALL-E
    encoder: the safetensors file ``download --trust-pickle`` made). Anything else is a
    :class:`WeightsError` naming the path and the registry."""
    if not name_or_path or os.path.exists(name_or_path):
        return name_or_path
    release = get(name_or_path)
    if release is None:
        if os.sep in name_or_path or "." in os.path.basename(name_or_path):
            return name_or_path             # a path that does not exist: its reader says so
        raise UnknownName(f"{name_or_path!r} is neither a file nor an official checkpoint "
                           f"name (python -m mim.weights list)")
    if release.format == "dalle":
        conv = _converted_path(release)
        if not os.path.exists(conv):
            raise WeightsError(f"{release.name}: OpenAI publishes a pickled module; fetch and "
                               f"convert it once where you trust it: python -m mim.weights "
                               f"download {release.name} --trust-pickle (URL {release.urls[0]}; "
                               f"or place encoder.pkl by hand at {cache_path(release)})")
        check(release, cache_path(release))
        return conv
    if not fetch and not os.path.exists(cache_path(release)):
        raise _fail(release, release.urls[0], "not in the cache")
    return converted(release, download(release))


def converted(release: Release, path: str) -> str:
    """A torch-file release once converted to safetensors beside it (its state dict, and
    its training arguments as JSON metadata for the loaders that read them), written
    atomically at first use and read from then on; a safetensors release as it is."""
    if path.endswith(".safetensors"):
        return path
    dst = _converted_path(release)
    if os.path.exists(dst):
        return dst
    import safetensors.torch

    from mim.checkpoints import weights
    flat, args = weights.read_with_args(path)
    meta = {"format": release.format, "source": release.urls[0]}
    if args is not None:
        meta["args"] = json.dumps(args, default=str)
    tmp = dst + f".tmp{os.getpid()}.safetensors"
    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in flat.items()}, tmp, metadata=meta)
    os.replace(tmp, dst)
    return dst


def convert_dalle(release: Release, trust_pickle: bool) -> str:
    """The DALL-E encoder's pickle, converted to a safetensors state dict beside it."""
    from mim.checkpoints import dalle
    src = download(release)
    dst = _converted_path(release)
    if not os.path.exists(dst):
        tmp = dst + f".tmp{os.getpid()}.safetensors"
        dalle.convert_pickle(src, tmp, trust_pickle=trust_pickle)
        os.replace(tmp, dst)
    return dst
