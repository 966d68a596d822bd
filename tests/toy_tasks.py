"""Toy tasks for the task-protocol tests: a target from a frozen random conv net, and an
EMA of the parameters updated once per optimizer step."""
import math

import safetensors.torch
import torch
import torch.nn.functional as F

from mim import tasks

SIZE = 8


def _linear_init(gen):
    return {"head": {"weight": torch.randn(4, 3 * SIZE * SIZE, generator=gen) * 0.01,
                     "bias": torch.zeros(4)}}


def _predict(params, images):
    return F.linear(images.flatten(1), params["head"]["weight"], params["head"]["bias"])


# ---------------------------------------------------------------- frozen target network


def conv_init(gen):
    return {"conv": {"weight": torch.randn(4, 3, 3, 3, generator=gen), "bias": torch.randn(4, generator=gen)}}


def load_conv(path, gen):
    if path is None:
        return conv_init(gen)
    flat = safetensors.torch.load_file(path)
    return {"conv": {"weight": flat["conv.weight"], "bias": flat["conv.bias"]}}


def target(net, images):
    return F.relu(F.conv2d(images, net["conv"]["weight"].to(images.dtype),
                           net["conv"]["bias"].to(images.dtype), stride=2)).mean((2, 3))


class FrozenTask:
    """The loss regresses the frozen net's pooled features of each image."""

    @staticmethod
    def init(config, gen):
        return _linear_init(gen), {}

    @staticmethod
    def frozen_networks(config):
        return {"teacher": tasks.Frozen(weights=config.teacher_weights, load=load_conv)}

    @staticmethod
    def loss(params, model_state, batch, config, train, frozen):
        with torch.no_grad():
            y = target(frozen["teacher"], batch["image"])
        value = F.mse_loss(_predict(params, batch["image"]).float(), y.float())
        return value, (model_state, {})

    @staticmethod
    def param_rules(config):
        return tasks.ParamRules()


# ---------------------------------------------------------------- EMA of the parameters


M0 = 0.9


def momentum(k, total):
    """MoBY's schedule: m = 1 - (1 - m0)(cos(pi k / K) + 1) / 2."""
    return 1.0 - (1.0 - M0) * (math.cos(math.pi * k / total) + 1.0) / 2.0


class EmaTask:
    @staticmethod
    def init(config, gen):
        params = _linear_init(gen)
        return params, {"ema": {k: {n: t.clone() for n, t in v.items()} for k, v in params.items()}}

    @staticmethod
    def loss(params, model_state, batch, config, train, frozen):
        value = F.cross_entropy(_predict(params, batch["image"]).float(), batch["label"] % 4)
        return value, (model_state, {})

    @staticmethod
    def update_state_after_step(params, model_state, step, total_steps, config):
        m = 1.0 - (1.0 - M0) * (torch.cos(math.pi * step.double() / total_steps) + 1.0) / 2.0
        ema = [model_state["ema"]["head"][n] for n in ("weight", "bias")]
        cur = [params["head"][n] for n in ("weight", "bias")]
        for e, p in zip(ema, cur):
            e.mul_(m.to(e.dtype)).add_((1.0 - m).to(e.dtype) * p)

    @staticmethod
    def param_rules(config):
        return tasks.ParamRules()


# ---------------------------------------------------------------- two views per image


def view_transform(config, size, scale):
    from timm.data import create_transform
    from mim.data import transforms as T
    d = config.data

    def t(img):
        crop = create_transform(size, is_training=True, scale=scale, hflip=0.5, use_prefetcher=True)
        # timm's prefetcher transform stops at uint8; finish() normalises when the workers must
        return T.finish(_pil_crop(crop, img),
                        VIEWS_MEAN[size], VIEWS_STD[size], d.device_normalize)
    return t


def _pil_crop(crop, img):
    """timm's prefetcher transform without its final ToNumpy: a PIL image."""
    for op in crop.transforms[:-1]:
        img = op(img)
    return img


VIEWS_MEAN = {8: (0.5, 0.5, 0.5), 4: (-0.125, -0.125, -0.125)}
VIEWS_STD = {8: (0.25, 0.25, 0.25), 4: (1.25, 1.25, 1.25)}


class ViewsTask:
    @staticmethod
    def init(config, gen):
        return _linear_init(gen), {}

    @staticmethod
    def train_transform(config):
        from mim.data import transforms as T
        return T.MultiView({"image": view_transform(config, 8, (0.5, 1.0)),
                            "small": view_transform(config, 4, (0.2, 1.0))})

    @staticmethod
    def image_keys(config, train):
        from mim.tasks import View
        return {"image": View(8, VIEWS_MEAN[8], VIEWS_STD[8]), "small": View(4, VIEWS_MEAN[4], VIEWS_STD[4])}

    @staticmethod
    def loss(params, model_state, batch, config, train, frozen):
        z = _predict(params, batch["image"]) + F.interpolate(batch["small"], size=SIZE).flatten(1)[:, :4]
        return F.cross_entropy(z.float(), batch["label"] % 4), (model_state, {})

    @staticmethod
    def param_rules(config):
        return tasks.ParamRules()
