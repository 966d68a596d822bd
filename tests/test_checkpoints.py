"""Atomic checkpoints: round trip, corruption detection, keep-last-K."""
import os

import pytest
import torch

from mim.checkpoints import io as ckpt


def _state(v=1.0):
    return {"step": torch.tensor(3), "params": {"w": torch.full((2, 3), v), "b": torch.zeros(3)},
            "opt": {"mu": {"w": torch.ones(2, 3) * v}}}


def test_round_trip(tmp_path):
    root = str(tmp_path)
    ckpt.save(root, 10, _state(2.0), {"note": "x"}, keep=3)
    path, meta = ckpt.latest(root)
    assert meta["step"] == 10 and meta["note"] == "x"
    target = _state(0.0)
    ckpt.restore_into(target, path)
    assert torch.equal(target["params"]["w"], torch.full((2, 3), 2.0))
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]


def test_corrupt_or_truncated_newest_falls_back_to_previous(tmp_path, caplog):
    root = str(tmp_path)
    ckpt.save(root, 1, _state(1.0), {}, keep=5)
    p2 = ckpt.save(root, 2, _state(2.0), {}, keep=5)
    p3 = ckpt.save(root, 3, _state(3.0), {}, keep=5)
    with open(os.path.join(p3, ckpt.STATE), "r+b") as f:  # truncate
        f.truncate(os.path.getsize(os.path.join(p3, ckpt.STATE)) // 2)
    with open(os.path.join(p2, ckpt.STATE), "r+b") as f:  # flip a byte
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    path, meta = ckpt.latest(root)
    assert meta["step"] == 1
    assert "checksum mismatch" in caplog.text
    os.remove(os.path.join(path, ckpt.META))
    assert ckpt.latest(root) is None


def test_keep_last_k_never_deletes_the_only_good_one(tmp_path):
    root = str(tmp_path)
    for s in range(1, 5):
        ckpt.save(root, s, _state(s), {}, keep=2)
    assert [s for s, _ in ckpt.list_steps(root)] == [3, 4]
    # corrupt both kept checkpoints' newest... then save: the good one must survive pruning
    good = ckpt.save(root, 5, _state(5), {}, keep=2)
    os.remove(os.path.join(ckpt.list_steps(root)[0][1], ckpt.STATE))  # step 4 broken
    for s, p in ckpt.list_steps(root):
        if s == 5:
            with open(os.path.join(p, ckpt.STATE), "ab") as f:
                f.write(b"junk")
    # now no checkpoint verifies; a new one is saved and nothing good is lost
    ckpt.save(root, 6, _state(6), {}, keep=1)
    assert ckpt.latest(root)[1]["step"] == 6
    assert good  # written path existed


def test_structure_mismatch_names_the_problem(tmp_path):
    root = str(tmp_path)
    path = ckpt.save(root, 1, _state(), {}, keep=1)
    other = {"step": torch.tensor(0), "params": {"v": torch.zeros(2)}}
    with pytest.raises(ckpt.CheckpointError, match="another experiment"):
        ckpt.restore_into(other, path)
