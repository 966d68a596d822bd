"""Checkpoints: atomic save/restore of train states, import/export of official weights.

:data:`FORMATS` names, for each official weight layout a run can start from
(``config.init.format``), the module whose ``load_for_finetune(params, path, model_cfg)``
fills a freshly initialised tree from such a file; ``"mim"`` (a mim checkpoint of the
same experiment) is handled by the train loop itself. :mod:`mim.checkpoints.registry` names
the references' released files and resolves a name to a verified download in the cache.
"""

FORMATS = {
    "timm": "mim.checkpoints.timm_vit",   # timm VisionTransformer weights
    "mae": "mim.checkpoints.mae",         # facebookresearch/mae pretraining / fine-tuning
    "swin": "mim.checkpoints.swin",       # microsoft Swin / SimMIM classification weights
    "simmim": "mim.checkpoints.swin",     # SimMIM pretraining (Swin or BEiT-style ViT encoder)
    "beit": "mim.checkpoints.beit",       # microsoft/unilm BEiT pretraining / fine-tuned weights
    "moby": "mim.checkpoints.moby",       # Transformer-SSL MoBY pretraining (its online encoder for Swin)
}


def get(fmt: str):
    """The module that imports ``init.format=fmt`` files."""
    import importlib

    if fmt not in FORMATS:
        raise ValueError(f"init.format={fmt!r} is not an official format; known: {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[fmt])
