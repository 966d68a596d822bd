"""Convert weights between the official checkpoint layouts mim knows and mim's own
safetensors trees.

    python -m mim.convert --from=mae --to=mim --config=experiments/mae_base.py \\
        mae_visualize_vit_base.pth mae_base.safetensors
    python -m mim.convert --from=mim --to=mae_finetune runs/mae_ft mae_ft.pth

``mim``: a safetensors file of the tree, keys ``params.<official name>`` (and
``model_state.<name>`` for models with state, e.g. MoBY's momentum encoder and queues),
the model config in the file's metadata; it starts a run with
``--config.init.format=mim --config.init.checkpoint=FILE``. As input, a mim checkpoint
directory or run workdir (its newest checkpoint; the config from its ``meta.json``) is
read too.

Official inputs: a state dict saved with ``torch.save`` (read with
``weights_only=True``; a ``{"model": ...}`` wrapper is unwrapped) or safetensors. Their
model hyper-parameters (head counts, windows, decoder shape) are not all in a state dict:
``--config=experiments/FILE.py[:variant]`` gives them (its ``config.model``); nothing is
inferred from shapes. Every key and shape is checked against that model. Official outputs:
``{"model": state_dict}`` in a ``.pth`` file, as the references save, or a bare
``.safetensors``. Between two official formats of the same model the tree is the bridge.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
from typing import Callable, Dict, Optional, Tuple

import ml_collections
import torch

from mim import cli
from mim import tree as T

MIM = "mim"


@dataclasses.dataclass
class Format:
    models: Tuple[str, ...]               # config.model.name values this layout holds
    module: str                           # mim.checkpoints module
    doc: str
    load: Callable                        # (module, state_dict, cfg) -> (params, model_state)
    export: Callable                      # (module, params, model_state, cfg) -> state_dict


def _mae(kind):
    return dict(load=lambda m, sd, cfg: (m.load_official(sd, cfg, kind=kind), {}),
                export=lambda m, p, s, cfg: m.export_official(p, kind=kind))


def _timm_load(m, sd, cfg):
    from mim.checkpoints import mae as mae_ckpt
    # timm's VisionTransformer and MAE's models_vit share one layout (models_vit subclasses it).
    return mae_ckpt.load_official(sd, cfg, kind="vit"), {}


FORMATS: Dict[str, Format] = {
    "timm": Format(("vit",), "mim.checkpoints.timm_vit",
                   "timm VisionTransformer state_dict (vit_*; also DeiT, AugReg)",
                   load=_timm_load, export=lambda m, p, s, cfg: m.to_state_dict(p)),
    "mae": Format(("mae",), "mim.checkpoints.mae",
                  "facebookresearch/mae pretraining model (models_mae: encoder + decoder)", **_mae("mae")),
    "mae_finetune": Format(("vit",), "mim.checkpoints.mae",
                           "facebookresearch/mae fine-tuned / linear-probe ViT (models_vit)", **_mae("vit")),
    "swin": Format(("swin",), "mim.checkpoints.swin",
                   "microsoft/Swin-Transformer classification model (timm's Swin layout is read too)",
                   load=lambda m, sd, cfg: (m.load_official(sd, cfg), {}),
                   export=lambda m, p, s, cfg: m.export_official(p, cfg)),
    "simmim": Format(("simmim", "swin", "beit"), "mim.checkpoints.swin",
                     "microsoft/SimMIM pretraining (encoder.* + decoder.*) or fine-tuned Swin / ViT",
                     load=lambda m, sd, cfg: (m.load_official(sd, cfg), {}),
                     export=lambda m, p, s, cfg: m.export_official(p, cfg)),
    "beit": Format(("beit_pretrain", "beit"), "mim.checkpoints.beit",
                   "microsoft/unilm BEiT pretraining (lm_head) or fine-tuned ViT",
                   load=lambda m, sd, cfg: (m.load_official(sd, cfg), {}),
                   export=lambda m, p, s, cfg: m.export_official(p, cfg)),
    "moby": Format(("moby",), "mim.checkpoints.moby",
                   "SwinTransformer/Transformer-SSL MoBY (online + momentum encoders, queues)",
                   load=lambda m, sd, cfg: m.load_official(sd, cfg),
                   export=lambda m, p, s, cfg: m.export_official(p, s, cfg)),
}


def available() -> Dict[str, Format]:
    """The formats whose checkpoint module exists in this installation."""
    out = {}
    for name, f in FORMATS.items():
        try:
            importlib.import_module(f.module)
        except ModuleNotFoundError:
            continue
        out[name] = f
    return out


class ConvertError(ValueError, cli.UsageMistake):
    """A mistake in the command line or its files (exit status 2)."""


def looks_like(flat) -> str:
    """Which layout a flat state dict's key names look like, for an error message."""
    keys = set(flat)

    def has(*prefixes):
        return any(k.startswith(prefixes) for k in keys)

    if has("params."):
        return "a mim tree (--from=mim)"
    if any(k.endswith("blocks.input.w") for k in keys):
        return "a DALL-E encoder (config.tokenizer.weights; not a model mim.convert converts)"
    if has("encoder_k.", "queue1", "queue2"):
        return "a MoBY pretraining checkpoint (--from=moby)"
    if has("decoder_embed.", "decoder_pred."):
        return "an MAE pretraining model (--from=mae)"
    if has("encoder.") and "decoder.0.weight" in keys:
        return "a SimMIM pretraining model (--from=simmim)"
    if has("layers.0.blocks.0.", "encoder.layers.0.blocks.0."):
        return "a Swin model (--from=swin)"
    if has("lm_head.", "rel_pos_bias.") or any("relative_position_bias_table" in k or k.endswith(".gamma_1")
                                               for k in keys):
        return "a BEiT model (--from=beit)"
    if has("blocks.0.attn.qkv.") and "cls_token" in keys:
        return ("an MAE fine-tuned ViT (--from=mae_finetune)" if has("fc_norm.")
                else "a timm / MAE-encoder ViT (--from=timm, or --from=mae for MAE's encoder-only "
                     "pretrained weights)")
    return f"no layout mim knows (first keys: {sorted(keys)[:3]})"


def _format(name: str) -> Format:
    formats = available()
    if name not in formats:
        raise ConvertError(f"unknown format {name!r}; known: {', '.join([MIM, *formats])}")
    return formats[name]


def _check_model(fmt: str, cfg):
    f = _format(fmt)
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if name not in f.models:
        raise ConvertError(f"format {fmt!r} holds {' or '.join(f.models)} models; the config's "
                           f"model is {name!r}")
    return f


# ----------------------------------------------------------------------------------------
# mim trees.


def save_mim(params: dict, model_state: dict, cfg, path: str) -> None:
    import safetensors.torch
    flat = {f"params.{k}": v.detach().contiguous() for k, v in T.flatten(params).items()}
    flat.update({f"model_state.{k}": v.detach().contiguous() for k, v in T.flatten(model_state).items()})
    meta = {"format": MIM, "model": cfg.to_json()}
    _atomic(path, lambda tmp: safetensors.torch.save_file(flat, tmp, metadata=meta))


def load_mim(path: str, ema: bool = False):
    """``(params, model_state, model config or None)`` of a mim tree file, checkpoint
    directory or run workdir; ``ema``: the trainable weights replaced by the run's average
    (``config.ema``, the checkpoint's ``ema.*``)."""
    import safetensors

    from mim.checkpoints import io, weights
    path = os.fspath(path)
    cfg = None
    if os.path.isdir(path):
        ckpt_dir = path
        if not os.path.exists(os.path.join(path, io.STATE)):
            found = io.latest(os.path.join(path, "checkpoints"))
            if found is None:
                raise FileNotFoundError(f"{path}: neither a mim checkpoint directory nor a workdir "
                                        f"with checkpoints/step_*")
            ckpt_dir = found[0]
        with open(os.path.join(ckpt_dir, io.META)) as f:
            cfg = _config(json.load(f)["config"]["model"])
        flat = weights.read_state_dict(ckpt_dir)
    elif path.endswith(".safetensors"):
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("model"):
            cfg = _config(json.loads(meta["model"]))
        flat = weights.read_state_dict(path)
    else:
        raise ConvertError(f"{path}: a mim tree is a .safetensors file, a checkpoint directory or "
                           f"a workdir")
    params = {k[len("params."):]: v for k, v in flat.items() if k.startswith("params.")}
    if not params:
        raise ConvertError(f"{path} holds no 'params.' tensors: not a mim tree (official weights "
                           f"need --from=<their format>)")
    if ema:
        avg = {k[len("ema."):]: v for k, v in flat.items() if k.startswith("ema.")}
        if not avg:
            raise ConvertError(f"{path} holds no weight average (ema.*): the run had no "
                               f"config.ema.decay > 0")
        params.update({k: v.to(params[k].dtype) for k, v in avg.items()})
    state = {k[len("model_state."):]: v for k, v in flat.items() if k.startswith("model_state.")}
    return T.unflatten(params), T.unflatten(state), cfg


def _config(d: dict) -> ml_collections.ConfigDict:
    """A model config from JSON: lists back to the tuples the model configs use."""
    def tuples(v):
        if isinstance(v, dict):
            return {k: tuples(x) for k, x in v.items()}
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v
    return ml_collections.ConfigDict(tuples(d))


# ----------------------------------------------------------------------------------------
# Conversion.


def read(fmt: str, path: str, cfg=None, ema: bool = False):
    """``(params, model_state, cfg)`` from ``path`` in format ``fmt`` (``ema``: a mim run's
    weight average instead of its weights)."""
    if ema and fmt != MIM:
        raise ConvertError(f"--ema reads a mim run's weight average; --from={fmt} has none")
    if fmt == MIM:
        params, state, saved = load_mim(path, ema)
        if cfg is None:
            if saved is None:
                raise ConvertError(f"{path} records no model config; pass --config")
            cfg = saved
        return params, state, cfg
    if cfg is None:
        raise ConvertError(f"--from={fmt}: official weights do not state every model "
                           f"hyper-parameter (head counts, windows, decoder); pass "
                           f"--config=experiments/FILE.py[:variant] for the model they are")
    f = _check_model(fmt, cfg)
    from mim.checkpoints import weights
    try:
        sd = weights.read_state_dict(path)
    except ValueError as e:     # garbage, truncated, a pickled object: one line, a mistake
        raise ConvertError(f"{path}: not a checkpoint file mim can read ({str(e)[:200]})") from e
    try:
        params, state = f.load(importlib.import_module(f.module), sd, cfg)
    except (ValueError, KeyError) as e:
        raise ConvertError(f"{path} does not load as --from={fmt} for this {cfg.get('name')!r} "
                           f"config: it looks like {looks_like(sd)} ({str(e)[:160]})") from e
    return params, state, cfg


def write(fmt: str, params: dict, model_state: dict, cfg, path: str) -> None:
    if fmt == MIM:
        return save_mim(params, model_state, cfg, path)
    f = _check_model(fmt, cfg)
    sd = f.export(importlib.import_module(f.module), params, model_state, cfg)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if path.endswith(".safetensors"):
        import safetensors.torch
        _atomic(path, lambda tmp: safetensors.torch.save_file(sd, tmp))
    else:
        _atomic(path, lambda tmp: torch.save({"model": sd}, tmp))


def convert(src: str, dst: str, from_fmt: str, to_fmt: str, cfg=None, ema: bool = False):
    """Convert ``src`` (format ``from_fmt``) to ``dst`` (format ``to_fmt``); returns the
    model config used. ``ema``: export a mim run's weight average (``config.ema``)."""
    if from_fmt != MIM:
        _format(from_fmt)
    if to_fmt != MIM:
        _format(to_fmt)
    params, state, cfg = read(from_fmt, src, cfg, ema)
    write(to_fmt, params, state, cfg, dst)
    return cfg


def _atomic(path: str, save: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save(tmp)
    os.replace(tmp, path)


def _help() -> str:
    lines = [f"  {MIM:13s} mim safetensors tree (params.*, model_state.*, config in its metadata); "
             f"or a mim checkpoint dir / workdir as input"]
    for name, f in available().items():
        lines.append(f"  {name:13s} {f.doc} [model: {', '.join(f.models)}]")
    return "formats:\n" + "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mim.convert", description=__doc__.split("\n\n")[0],
                                epilog=_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="from_fmt", required=True, help="format of IN (see below)")
    p.add_argument("--to", dest="to_fmt", required=True, help="format of OUT (see below)")
    p.add_argument("--config", default="", help="experiment FILE.py[:variant] whose config.model "
                   "the weights are for (required to read official weights)")
    p.add_argument("--ema", action="store_true", help="export the run's weight average "
                   "(config.ema) instead of its weights (--from=mim)")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    a = p.parse_args(argv)
    cfg: Optional[ml_collections.ConfigDict] = None
    if a.config:
        from mim.sweep import load_config
        cfg = load_config(a.config).model
    from mim.checkpoints import registry
    try:
        cfg = convert(registry.resolve(a.input), a.output, a.from_fmt, a.to_fmt, cfg, ema=a.ema)
    except (ConvertError, FileNotFoundError) as e:
        if cli.debug([]):
            raise
        p.exit(2, f"mim.convert: error: {cli.one_line(e)}\n")     # one line, as argparse's status
    print(f"wrote {a.output} ({a.to_fmt}, model {cfg.get('name')})")


if __name__ == "__main__":
    import sys
    sys.exit(cli.run_command("mim.convert", main))
