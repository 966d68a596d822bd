"""Model EMA (config.ema, mim.train.ema): the decay against timm's ModelEmaV3, the average
against one written out by hand over several steps with accumulation under every precision
policy, evaluation beside the raw weights, bitwise resume, and export with mim.convert."""
import os

import pytest
import torch
from timm.utils import ModelEmaV3

from conftest import experiment, few_steps
from mim import bench, convert, tree
from mim.checkpoints import io as ckpt
from mim.train import ema as ema_lib
from mim.train import loop
from mim.train.setup import Setup


def test_decay_is_timms_model_ema_v3():
    m = torch.nn.Linear(2, 2)
    for warmup in (False, True):
        ref = ModelEmaV3(m, decay=0.999, use_warmup=warmup)
        for step in range(1, 60):
            want = ref.get_decay(step) if warmup else ref.get_decay()
            got = float(ema_lib.decay_at(torch.tensor(step), 0.999, warmup))
            assert abs(got - want) < 1e-6, (warmup, step, got, want)


def _trainable_weights(state, be):
    """The weights the average follows: the fp32 masters under O2, else the parameters."""
    if "master" in state:
        return {n: v.clone() for n, v in state["master"].items()}
    flat = tree.flatten(state["params"])
    return {n: flat[n].detach().float().clone() for n in state["ema"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "amp_bf16", "amp_fp16"])
@pytest.mark.parametrize("warmup", [False, True])
def test_average_equals_a_hand_written_ema(precision, warmup, small_data):
    c = experiment("vit_b32", "tiny", **{"data.path": small_data, "precision": precision,
                                         "grad_accum": 2, "batch_size": 8, "ema.decay": 0.8,
                                         "ema.warmup": warmup, "model.depth": 1})
    setup = Setup(c, "/nonexistent")
    built = setup.build_train(10, 5)
    state = built.state
    hand = {n: v.clone() for n, v in _trainable_weights(state, setup.be).items()}
    assert set(hand) == set(built.trainable)
    for k in range(4):
        batch = bench.synthetic_batch(c, setup.task, 8, "cpu", seed=k)
        state, m = built.fns.train_step(state, batch)
        assert torch.isfinite(m["loss"]) and float(m["loss"]) > 0
        now = _trainable_weights(state, setup.be)
        if warmup:   # ModelEmaV3.get_decay(step) with step = updates done: 0, then 1 - (1 + t)^-2/3
            t = k
            d = 0.0 if t == 0 else min(0.8, 1 - (1 + t) ** (-2 / 3))
        else:
            d = 0.8
        for n in hand:
            hand[n] = d * hand[n] + (1 - d) * now[n]
    for n in hand:
        torch.testing.assert_close(state["ema"][n], hand[n], rtol=1e-5, atol=1e-6)
    # it moved: the average is neither the start nor the last weights
    moved = [n for n in hand if not torch.equal(state["ema"][n], now[n])]
    assert moved


def test_run_evaluates_the_average_resumes_bitwise_and_exports(tmp_path, small_data):
    over = {"ema.decay": 0.5, "steps": 4, "checkpoint_every": 2, "eval_every": 4}
    straight = str(tmp_path / "straight")
    summary = loop.train(few_steps("vit_b32", small_data, **over), straight)
    assert "eval_ema_acc1" in summary and "eval_acc1" in summary
    assert summary["eval_ema_loss"] != summary["eval_loss"]
    # 2 steps, then the same command with steps=4 continues it
    split = str(tmp_path / "split")
    loop.train(few_steps("vit_b32", small_data, **{**over, "steps": 2}), split)
    loop.train(few_steps("vit_b32", small_data, **over), split)
    a = ckpt.load_tensors(ckpt.latest(os.path.join(straight, "checkpoints"))[0])
    b = ckpt.load_tensors(ckpt.latest(os.path.join(split, "checkpoints"))[0])
    ema_keys = [k for k in a if k.startswith("ema.")]
    assert ema_keys
    for k in ema_keys:
        assert torch.equal(a[k], b[k]), k
    # mim.convert --ema: the average as the weights of a mim tree
    out = str(tmp_path / "ema.safetensors")
    convert.convert(straight, out, "mim", "mim", ema=True)
    params, _, _ = convert.load_mim(out)
    flat = tree.flatten(params)
    for k in ema_keys:
        assert torch.equal(flat[k[len("ema."):]], a[k]), k
    plain = str(tmp_path / "plain")
    loop.train(few_steps("vit_b32", small_data, steps=1, eval_every=1, checkpoint_every=1), plain)
    with pytest.raises(convert.ConvertError, match="no weight average"):
        convert.load_mim(plain, ema=True)


def test_config_is_checked():
    from mim import config as config_lib
    c = experiment("vit_b32", "tiny", **{"ema.decay": 1.0})
    with pytest.raises(config_lib.ConfigError, match="ema.decay"):
        config_lib.validate(c)
    c = experiment("vit_b32", "tiny", **{"ema.warmup": True})
    with pytest.raises(config_lib.ConfigError, match="ema.warmup"):
        config_lib.validate(c)
