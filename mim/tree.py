"""Parameter trees: nested ``dict``s of tensors whose flat ``"."``-joined names
are the official ``state_dict`` keys.

Integer children (transformer blocks) are stored under string keys ``"0"``,
``"1"``... so that ``flatten(tree)`` gives ``blocks.0.attn.qkv.weight``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Tuple

import torch

Tree = Dict[str, Any]


def flatten(tree: Tree, prefix: str = "", sep: str = ".") -> Dict[str, Any]:
    """Flat ``{name: leaf}`` dict in insertion (= definition) order."""
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, name, sep))
        else:
            out[name] = v
    return out


def unflatten(flat: Dict[str, Any], sep: str = ".") -> Tree:
    """Inverse of :func:`flatten`."""
    tree: Tree = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"name {name!r} collides with a leaf at {p!r}")
        if leaf in node:
            raise ValueError(f"duplicate name {name!r}")
        node[leaf] = v
    return tree


def leaves(tree: Tree) -> list:
    return list(flatten(tree).values())


def items(tree: Tree) -> Iterator[Tuple[str, Any]]:
    return iter(flatten(tree).items())


def map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 - mirrors jax.tree.map
    """Apply ``fn`` leaf-wise over trees of the same structure."""
    out: Tree = {}
    for k, v in tree.items():
        others = [r[k] for r in rest]
        out[k] = map(fn, v, *others) if isinstance(v, dict) else fn(v, *others)
    return out


def map_with_name(fn: Callable[[str, Any], Any], tree: Tree, prefix: str = "") -> Tree:
    out: Tree = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        out[k] = map_with_name(fn, v, name) if isinstance(v, dict) else fn(name, v)
    return out


def structure_equal(a: Tree, b: Tree) -> bool:
    return list(flatten(a).keys()) == list(flatten(b).keys())


def count(tree: Tree) -> int:
    return sum(t.numel() for t in leaves(tree) if isinstance(t, torch.Tensor))


def to(tree: Tree, device=None, dtype=None) -> Tree:
    """Move (and optionally cast floating-point) leaves."""

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return map(move, tree)


def clone(tree: Tree) -> Tree:
    return map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def subtree(tree: Tree, path: str) -> Tree:
    node = tree
    for p in path.split("."):
        node = node[p]
    return node
