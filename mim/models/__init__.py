"""Models as ``init(gen, cfg) -> params`` and ``apply(params, x, cfg, train) -> (out, aux)``.

Each model module also states its parameter facts, so tasks never branch on the model:
``no_weight_decay(cfg)`` (regexes over flat names exempt from weight decay beyond 1-D
tensors), ``num_layers(cfg)`` and ``layer_id(name, cfg)`` (ids 0..num_layers + 1 for
layer-wise lr decay: 0 embeddings, i + 1 block i, num_layers + 1 the top), and
``features(params, x, cfg, blocks=False) -> {"pooled": (B, C), "blocks": [(B, L, C)]}``
(the encoder without its head, for linear probing, k-NN and embeddings).
"""
from mim.models import beit, beit_pretrain, mae, moby, simmim, swin, vit

REGISTRY = {"vit": vit, "swin": swin, "beit": beit, "mae": mae, "simmim": simmim,
            "beit_pretrain": beit_pretrain, "moby": moby}


def get(name: str):
    """The model module registered as ``name`` (``config.model.name``)."""
    if name not in REGISTRY:
        raise ValueError(f"model name {name!r} is not registered; known models: {sorted(REGISTRY)}")
    return REGISTRY[name]
