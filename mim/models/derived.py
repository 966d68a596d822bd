"""A config derived from another inside a traced function.

``torch.compile`` cannot trace the construction of an ``ml_collections.ConfigDict`` (the
loss would break the graph, and a break inside ``torch.func.grad_and_value`` sends the
whole gradient back to eager mode), so a model that runs another model's functions with
some fields changed passes this read-only view instead: a plain object whose lookups
dynamo follows.
"""
from __future__ import annotations

from typing import Any, Mapping


class Derived:
    """Read-only: ``overrides`` first, then ``base``, then ``defaults`` (a config of the
    other model, for the fields ``base`` does not have)."""

    def __init__(self, base, overrides: Mapping[str, Any], defaults=None):
        self.__dict__["_base"] = base
        self.__dict__["_over"] = dict(overrides)
        self.__dict__["_defaults"] = defaults

    def __getattr__(self, key):
        d = self.__dict__
        if key in d["_over"]:
            return d["_over"][key]
        if key in d["_base"]:
            return d["_base"][key]
        if d["_defaults"] is not None and key in d["_defaults"]:
            return d["_defaults"][key]
        raise AttributeError(key)

    def __setattr__(self, key, value):
        raise AttributeError(f"a derived config is read-only ({key})")

    def __getitem__(self, key):
        try:
            return self.__getattr__(key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key) -> bool:
        d = self.__dict__
        return key in d["_over"] or key in d["_base"] or (d["_defaults"] is not None and key in d["_defaults"])

    def get(self, key, default=None):
        return self[key] if key in self else default
