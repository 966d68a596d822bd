"""mim: functional masked-image-modeling and ViT training on NPU, GPU and CPU."""

__version__ = "0.1.0"
