"""Pure layer functions over parameter sub-trees, and their initialisers."""
from mim.nn.layers import (  # noqa: F401
    attention,
    drop_path,
    layer_norm,
    linear,
    mlp,
    patch_embed,
    vit_block,
)
