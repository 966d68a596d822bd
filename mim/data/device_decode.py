"""``data.decode='device'``: JPEGs decoded on the accelerator (nvJPEG on CUDA, through
``torchvision.io.decode_jpeg``), so the CPU workers only read files and draw random numbers.

The transform is still timm's (``create_transform``, prefetcher form); it is split in two:

* in the worker, :class:`DeferredTransform` reads the file's bytes and its header (no
  decode) and draws each random op's parameters exactly as timm's op would on the decoded
  image, from the same generators in the same order: RandomResizedCrop's box, the flip's
  coin. They travel with the bytes as one int64 ``geometry`` vector per image;
* on the device, :class:`DeviceDecoder` decodes the batch's JPEGs in one call and replays
  the ops with those parameters on tensors: crop + resize (antialiased, so that downscaling
  filters as PIL does), flip, resize + centre crop for evaluation. The result is the uint8
  channels-last batch that ``data.device_normalize`` normalises (and randomly erases) there.

So an image gets the same crop and flip as with ``data.decode='worker'`` from the same
seed; the pixels differ only by the resampling (tensor bicubic vs PIL's), a few grey
levels. Only the crop/flip/resize ops have a device form: colour jitter, RandAugment,
mixup/cutmix and random interpolation are refused by the config check.

Files that are not baseline 8-bit RGB or grey JPEGs ending in an end-of-image marker
(PNGs, CMYK or progressive JPEGs, truncated files, trailing bytes) are decoded in the worker
with PIL and run through timm's whole transform there, as with ``decode='worker'``; they
cross as finished uint8 images in the same batch. Unreadable files are skipped in the
worker as always. A JPEG that passes those checks but fails on the device is skipped with a
warning and counted in ``skipped``: in a training batch another image of the batch takes its
place (the batch keeps its size), in an evaluation batch it is dropped (no image is scored
twice). A crop box of zero width or height (timm draws one on a 1-pixel image) gives a black
image, as PIL's crop and resize do in the worker.
"""
from __future__ import annotations

import io
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import io as tvio
from torchvision import transforms as tv
from torchvision.transforms import functional as F

from mim.data import folder

# torchvision >= 0.29 announces that torchvision.io's decoders will move to TorchCodec.
_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"


class Encoded:
    """A JPEG's bytes (uint8, 1-d) and its header, opened lazily by PIL (not decoded):
    what timm's ops read for their parameters (``F.get_image_size``)."""

    def __init__(self, data: torch.Tensor, header: Image.Image):
        self.data, self.header = data, header


def _device_decodable(raw: bytes, img: Image.Image) -> bool:
    return (img.format == "JPEG" and img.mode in ("RGB", "L")
            and not img.info.get("progressive") and not img.info.get("progression")
            and raw.endswith(b"\xff\xd9"))


def read(path: str) -> Union[Encoded, Image.Image]:
    """The worker's read for ``decode='device'``: an :class:`Encoded` JPEG when the device
    can decode it, else the image decoded by PIL (:func:`mim.data.folder.load_rgb`)."""
    with open(path, "rb") as f:
        return read_bytes(f.read())


def read_bytes(raw: bytes) -> Union[Encoded, Image.Image]:
    """:func:`read` for bytes already in memory (a member of a tar shard, a dataset row)."""
    header = Image.open(io.BytesIO(raw))
    if _device_decodable(raw, header):
        return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), header)
    return folder.load_rgb(io.BytesIO(raw))


def _ops(compose) -> List[object]:
    """timm's transform as the ops the device replays; any other op is an error."""
    ops = []
    for op in getattr(compose, "transforms", [compose]):
        if isinstance(op, RandomResizedCropAndInterpolation):
            if isinstance(op.interpolation, (tuple, list)):
                raise ValueError("data.decode='device' needs one interpolation, not "
                                 "data.interpolation='random'")
            ops.append(op)
        elif isinstance(op, (tv.RandomHorizontalFlip, tv.RandomVerticalFlip, tv.Resize,
                             tv.CenterCrop)):
            ops.append(op)
        elif isinstance(op, MaybePILToTensor):
            continue                              # the device result is a tensor already
        else:
            raise ValueError(
                f"data.decode='device' cannot run {type(op).__name__} on the device; it replays "
                f"crops, flips and resizes only (set data.color_jitter=0 and data.auto_augment='', "
                f"or data.decode='worker')")
    return ops


def _num_params(op) -> int:
    if isinstance(op, RandomResizedCropAndInterpolation):
        return 4
    return 1 if isinstance(op, (tv.RandomHorizontalFlip, tv.RandomVerticalFlip)) else 0


class DeferredTransform:
    """The worker half: for an :class:`Encoded` JPEG, ``{"image": bytes, "geometry":
    params}`` with each random op's parameters drawn as the op draws them; for a decoded
    image, timm's whole transform (``geometry`` unused). Picklable for worker processes."""

    def __init__(self, compose):
        self.compose = compose
        self.ops = _ops(compose)
        self.width = sum(_num_params(op) for op in self.ops)

    def __call__(self, img) -> dict:
        if not isinstance(img, Encoded):
            return {"image": self.compose(img), "geometry": torch.zeros(self.width, dtype=torch.int64)}
        params: List[int] = []
        for op in self.ops:
            if isinstance(op, RandomResizedCropAndInterpolation):
                if params:
                    raise ValueError("RandomResizedCrop after another random op")
                params += op.get_params(img.header, op.scale, op.ratio)
            elif isinstance(op, (tv.RandomHorizontalFlip, tv.RandomVerticalFlip)):
                params.append(int(torch.rand(1).item() < op.p))   # torchvision's own draw
        return {"image": img.data, "geometry": torch.tensor(params, dtype=torch.int64)}


class DeviceDecoder:
    """The device half: a batch's images (1-d JPEG bytes or finished uint8 ``(C, H, W)``
    images, pinned on the host) and ``geometry`` in, one uint8 ``(N, C, H, W)``
    channels-last batch on ``device`` out, with the indices of the JPEGs that failed there.
    ``substitute``: each failed one is replaced by another image of the batch (training);
    else it is left out of the batch (evaluation)."""

    def __init__(self, compose, device):
        self.ops = _ops(compose)
        self.width = sum(_num_params(op) for op in self.ops)
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"data.decode='device': torchvision decodes JPEGs on CUDA (nvJPEG) or "
                             f"the CPU, not on {self.device.type}; set data.decode='worker'")

    def __call__(self, images: Sequence[torch.Tensor], geometry: torch.Tensor,
                 substitute: bool = True) -> Tuple[torch.Tensor, List[int]]:
        if geometry.dim() != 2 or geometry.shape != (len(images), self.width):
            raise ValueError(f"geometry of shape {tuple(geometry.shape)} for {len(images)} images "
                             f"and ops that draw {self.width} numbers each: a train batch "
                             f"replayed with the eval transform, or the other way round?")
        encoded = [i for i, x in enumerate(images) if x.dim() == 1]
        decoded = dict(zip(encoded, self._decode([images[i] for i in encoded])))
        out = []
        for i, x in enumerate(images):
            if x.dim() == 1:
                y = decoded[i]
                if y is not None:
                    y = self._replay_or_warn(y, geometry[i].tolist(), x.numel())
            else:
                y = x.to(self.device, non_blocking=True)
            out.append(y)
        failed = [i for i, y in enumerate(out) if y is None]
        good = [y for y in out if y is not None]
        if not good:
            raise RuntimeError(f"no JPEG of this batch of {len(images)} decoded on {self.device}")
        if substitute:
            out = [y if y is not None else good[k % len(good)] for k, y in enumerate(out)]
        else:
            out = good
        return torch.stack(out).contiguous(memory_format=torch.channels_last), failed

    def decode_batch(self, batch: Dict[str, object], train: bool) -> Dict[str, object]:
        """A loader batch with its JPEGs decoded: ``geometry`` consumed, the failed JPEGs
        added to ``skipped``; in evaluation (``train=False``) their rows are dropped from
        every per-image entry (labels, masks)."""
        batch = dict(batch)
        n = len(batch["image"])
        batch["image"], failed = self(batch["image"], batch.pop("geometry"), substitute=train)
        if failed:
            batch["skipped"] = batch["skipped"] + len(failed)
            if not train:
                keep = torch.tensor([i for i in range(n) if i not in set(failed)])
                batch = {k: v[keep] if k != "image" and torch.is_tensor(v) and v.dim() > 0
                         and v.shape[0] == n else v for k, v in batch.items()}
        return batch

    def _decode(self, data: List[torch.Tensor]) -> List[torch.Tensor]:
        if not data:
            return []
        mode = tvio.ImageReadMode.RGB
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION)
            try:
                return tvio.decode_jpeg(data, mode=mode, device=self.device)
            except RuntimeError:
                pass
            out = []                     # find the bad ones: decode one at a time
            for x in data:
                try:
                    out.append(tvio.decode_jpeg(x, mode=mode, device=self.device))
                except RuntimeError as e:
                    warnings.warn(f"skipping a JPEG of {x.numel()} bytes that failed to decode on "
                                  f"{self.device} ({e})")
                    out.append(None)
            return out

    def _replay_or_warn(self, x: torch.Tensor, params: List[int], nbytes: int) -> Optional[torch.Tensor]:
        try:
            return self._replay(x, params)
        except RuntimeError as e:
            warnings.warn(f"skipping a JPEG of {nbytes} bytes ({x.shape[-1]}x{x.shape[-2]} pixels) "
                          f"whose crop and resize failed on {self.device} ({e})")
            return None

    def _replay(self, x: torch.Tensor, params: List[int]) -> torch.Tensor:
        for op in self.ops:
            if isinstance(op, RandomResizedCropAndInterpolation):
                i, j, h, w = params[:4]
                params = params[4:]
                if h <= 0 or w <= 0:
                    # On a 1-pixel side timm's draw can pass a box whose rounded side is 0;
                    # PIL crops that to nothing and resizes it to black.
                    x = x.new_zeros((x.shape[0], *op.size))
                else:
                    x = F.resized_crop(x, i, j, h, w, list(op.size), op.interpolation, antialias=True)
            elif isinstance(op, (tv.RandomHorizontalFlip, tv.RandomVerticalFlip)):
                flip, params = params[0], params[1:]
                if flip:
                    x = x.flip(-1 if isinstance(op, tv.RandomHorizontalFlip) else -2)
            elif isinstance(op, tv.Resize):
                x = F.resize(x, op.size, op.interpolation, op.max_size, antialias=True)
            elif isinstance(op, tv.CenterCrop):
                x = F.center_crop(x, list(op.size))
        return x
