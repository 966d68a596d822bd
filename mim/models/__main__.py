"""``python -m mim.models``: every model and size mim builds, its parameter count, its
training FLOPs per image at its default resolution, and the official checkpoint formats
that load into it (``--config.init.format`` / ``python -m mim.convert --from``).

FLOPs are counted by ``torch.utils.flop_counter`` over one forward and backward of the
model's training computation (the loss for the pretraining models, the logits' sum for
classifiers), as :mod:`mim.bench` counts a step, on fake tensors: nothing is
allocated, so the largest models list in seconds. The counter sees matrix products and
convolutions (2 FLOPs per multiply-add), not element-wise work. Frozen networks (the
DALL-E tokenizer) train nothing: their row is one forward.

    python -m mim.models [--model=vit] [--markdown]
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

from mim import tree
from mim.models import REGISTRY

# Official checkpoint formats per model (names of mim.checkpoints.FORMATS / mim.convert).
# A checkpoint that trained the same network in another framework's layout is listed
# where mim's importer reads it: timm's ViT files into vit, MAE's encoders into vit for
# fine-tuning, SimMIM's Swin / ViT encoders into swin / beit.
LOADS = {
    "vit": ("timm", "mae"),
    "mae": ("mae",),
    "swin": ("swin", "simmim"),
    "beit": ("beit", "simmim"),
    "simmim": ("simmim",),
    "beit_pretrain": ("beit",),
    "moby": ("moby",),
    "dalle": ("dalle",),
}


@dataclasses.dataclass
class Entry:
    model: str
    size: str
    make: Callable[[], object]          # () -> model config
    resolution: int
    train: bool = True                  # False: a frozen network, FLOPs of one forward


def _vit_cfg(dims, patch, **kw):
    from mim.models import vit
    dim, depth, heads = dims
    return vit.config(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=224, **kw)


def entries() -> List[Entry]:
    from mim.models import beit, beit_pretrain, mae, simmim, swin, vit
    out = []
    for size, dims in vit.SIZES.items():
        patch = 14 if size == "huge" else 16
        out.append(Entry("vit", f"{size}/{patch}", lambda d=dims, p=patch: _vit_cfg(d, p), 224))
    out.append(Entry("vit", "base/32", lambda: _vit_cfg(vit.SIZES["base"], 32), 224))
    for size in mae.SIZES:
        out.append(Entry("mae", size, lambda s=size: mae.config(**mae.SIZES[s]), 224))
    for size, (dim, depths, heads) in swin.SIZES.items():
        out.append(Entry("swin", size, lambda d=dim, dp=depths, h=heads: swin.config(
            img_size=224, embed_dim=d, depths=dp, num_heads=h, window_size=7), 224))
    for size in ("base", "large"):
        dim, depth, heads = vit.SIZES[size]
        out.append(Entry("beit", f"{size}/16", lambda d=dim, dp=depth, h=heads: beit.config(
            embed_dim=d, depth=dp, num_heads=h), 224))
    for size, (dim, depth, heads) in beit_pretrain.SIZES.items():
        out.append(Entry("beit_pretrain", f"{size}/16", lambda d=dim, dp=depth, h=heads:
                         beit_pretrain.config(embed_dim=d, depth=dp, num_heads=h), 224))
    out.append(Entry("simmim", "swin-base/w6", lambda: simmim.config("swin"), 192))
    out.append(Entry("simmim", "vit-base/16", lambda: simmim.config("vit"), 224))
    if "moby" in REGISTRY:
        from mim.models import moby
        out.append(Entry("moby", "swin-tiny", lambda: moby.config(), 224))
    if "dalle" in REGISTRY:
        from mim.models import dalle
        out.append(Entry("dalle", "encoder", lambda: dalle.config(), 112, train=False))
    return out


def _loss(model: str, module, params, state, x: torch.Tensor, cfg) -> torch.Tensor:
    """The scalar whose gradient a training step of ``model`` takes."""
    b = x.shape[0]
    if model == "mae":
        noise = torch.rand(b, (cfg.img_size // cfg.patch_size) ** 2, device=x.device)
        return module.apply(params, x, noise, cfg, train=True)[0]
    if model == "simmim":
        g = cfg.encoder.img_size // cfg.mask_patch_size * cfg.mask_patch_size // module.patch_size(cfg)
        return module.apply(params, x, cfg, train=True, mask=torch.zeros(b, g, g, device=x.device))[0]
    if model == "beit_pretrain":
        # BEiT's blockwise masking removes 75 of the 196 patches (--num_mask_patches).
        g = cfg.img_size // cfg.patch_size
        mask = torch.zeros(b, g * g, dtype=torch.bool, device=x.device)
        logits, _ = module.apply(params, x, mask, cfg, train=True, max_masked=75)
        return logits.float().sum()
    if model == "moby":
        return module.forward(params, state, x, x, cfg, train=True)[0]
    if model == "dalle":
        return module.apply(params, x, cfg).float().sum()
    return module.apply(params, x, cfg, train=True)[0].float().sum()


def measure(e: Entry) -> Tuple[int, int]:
    """``(parameters, FLOPs per image)`` on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    module = REGISTRY[e.model]
    cfg = e.make()
    # Fake tensors (shapes and dtypes on the CPU, no storage): unlike the meta device,
    # autocast and the CPU kernels' shape rules apply as in a real step. The mode is
    # active only while the tensors are made: in the step, ops on them run fake, and
    # constants the model computes from its config (drop-path rates) stay real.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        made = module.init(torch.Generator(), cfg)
        params, state = made if isinstance(made, tuple) else (made, {})
        params = tree.map(lambda t: t.detach().requires_grad_(e.train and t.is_floating_point()), params)
        x = torch.zeros(2, 3, e.resolution, e.resolution)
    n_params = sum(t.numel() for t in tree.flatten(params).values())
    with FlopCounterMode(display=False) as counter:
        out = _loss(e.model, module, params, state, x, cfg)
        if e.train:
            out.backward()
    return n_params, counter.get_total_flops() // x.shape[0]


def table(model: str = "") -> List[Dict[str, object]]:
    rows = []
    for e in entries():
        if model and e.model != model:
            continue
        n, flops = measure(e)
        rows.append({"model": e.model, "size": e.size, "resolution": e.resolution,
                     "params_M": n / 1e6, "gflops_per_image": flops / 1e9,
                     "what": "train (fwd+bwd)" if e.train else "frozen (fwd)",
                     "formats": ", ".join(LOADS.get(e.model, ())) or "-"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mim.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help=f"only this model ({', '.join(sorted(REGISTRY))})")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    a = p.parse_args(argv)
    if a.model and a.model not in REGISTRY:
        p.error(f"--model={a.model!r}: known models are {', '.join(sorted(REGISTRY))}")
    rows = table(a.model)
    head = ("model", "size", "px", "params (M)", "GFLOPs/image", "counted", "official formats")
    cells = [(r["model"], r["size"], str(r["resolution"]), f"{r['params_M']:.1f}",
              f"{r['gflops_per_image']:.1f}", r["what"], r["formats"]) for r in rows]
    if a.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for c in cells:
            print("| " + " | ".join(c) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    for c in [head] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


if __name__ == "__main__":
    main()
