"""Relative position bias geometry (Shaw et al. 2018; Swin, Liu et al. 2021 Sec. 3.2;
BEiT, Bao et al. 2022 Sec. 2.6): which table row each token pair reads, the lookup into an
attention-logit bias, and resizing a table for another window or patch grid.

A table for an ``S x S`` window (or patch grid) has one row per 2-D offset, ``(2S-1)^2``
rows, plus, for BEiT-style models with a class token, :data:`NUM_EXTRA` rows for the pairs
an offset cannot express. Index buffers are pure functions of the size, cached per
(size, device) in eager mode.
"""
from __future__ import annotations

import math

import torch

# Relative positions a (2G-1)^2 table cannot express: class token to patches, patches to
# class token, class token to itself (BEiT's RelativePositionBias, the 3 last rows).
NUM_EXTRA = 3

_CACHE: dict = {}


def cached(fn, *key):
    """``fn(*key)``, reused per key in eager mode. Under torch.compile it is traced (and
    constant-folded) instead, since Dynamo cannot guard on a cache. Keys include the
    function's module and name, so two functions never share an entry."""
    if torch.compiler.is_compiling():
        return fn(*key)
    k = (fn.__module__, fn.__qualname__) + key
    if k not in _CACHE:
        _CACHE[k] = fn(*key)
    return _CACHE[k]


# --------------------------------------------------------------------------- index


def table_rows(size: int, extra: int = 0) -> int:
    """Rows of a table for an ``size x size`` window / patch grid."""
    return (2 * size - 1) ** 2 + extra


def table_size(rows: int, extra: int = 0) -> int:
    """The window / grid side ``S`` of a ``((2S-1)^2 + extra, heads)`` table."""
    side = math.isqrt(rows - extra)
    if rows < extra or side * side != rows - extra or side % 2 == 0:
        what = "(2S-1)^2" + (f" + {extra}" if extra else "")
        raise ValueError(f"a relative position bias table with {rows} rows is not {what}")
    return (side + 1) // 2


def _window_index(size: int, device) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"))
    coords = coords.flatten(1)                                  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (size - 1)  # (2, N, N), shifted to >= 0
    # Row-major index into the (2S-1) x (2S-1) table (Liu et al. 2021 Sec. 3.2, eq. 4).
    return (rel[0] * (2 * size - 1) + rel[1]).to(device)


def window_index(size: int, device=None) -> torch.Tensor:
    """``(S^2, S^2)`` index of each token pair of an ``S x S`` window into the table; the
    official Swin ``relative_position_index`` buffer. Cached: do not modify in place."""
    return cached(_window_index, size, torch.device(device or "cpu"))


def _class_token_index(grid: int, device) -> torch.Tensor:
    n = grid * grid
    inner = _window_index(grid, device)      # patch pairs: (2G-1)^2 offsets
    extra = table_rows(grid)
    idx = torch.empty(n + 1, n + 1, dtype=inner.dtype, device=inner.device)
    idx[1:, 1:] = inner
    idx[0, :] = extra           # class token attending to a patch
    idx[:, 0] = extra + 1       # a patch attending to the class token
    idx[0, 0] = extra + 2       # class token to itself
    return idx


def class_token_index(grid: int, device=None) -> torch.Tensor:
    """``(G^2 + 1, G^2 + 1)`` index (class token first) into a ``(2G-1)^2 + 3`` table; the
    official BEiT ``relative_position_index`` buffer. Cached: do not modify in place."""
    return cached(_class_token_index, grid, torch.device(device or "cpu"))


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(1, heads, N, N)`` attention-logit bias: ``table[index[i, j], h]`` at ``(h, i, j)``."""
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)


# --------------------------------------------------------------------------- resizing
# SimMIM utils.remap_pretrained_keys_swin / remap_pretrained_keys_vit, after BEiT's
# run_class_finetuning.py: offsets of the source table are laid on a geometric progression
# that reaches the target's outermost offset, and each head's grid is fitted with scipy's
# interp2d(kind="cubic") and evaluated at the target's integer offsets.


def geometric_ratio(src_half: int, dst_half: int) -> float:
    """Bisection for q with 1 + q + ... + q^(src_half-1) = dst_half; the reference's
    bounds (1.01, 1.5), stopping rule (1e-6) and final midpoint."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    return q


def bspline_basis(knots: torch.Tensor, u: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """``(len(u), len(knots) - degree - 1)`` B-spline basis values (Cox-de Boor), with the
    right end of the domain belonging to the last non-empty knot interval."""
    t = knots
    B = ((u[:, None] >= t[None, :-1]) & (u[:, None] < t[None, 1:])).to(t.dtype)
    last = int(torch.nonzero(t[1:] > t[:-1]).max())
    B[u >= t[-1], :] = 0
    B[u >= t[-1], last] = 1
    for d in range(1, degree + 1):
        n = len(t) - d - 1
        den_l = t[d:d + n] - t[:n]
        den_r = t[d + 1:d + 1 + n] - t[1:1 + n]
        left = torch.where(den_l > 0, (u[:, None] - t[None, :n]) / den_l.clamp_min(1e-300), 0.0)
        right = torch.where(den_r > 0, (t[None, d + 1:d + 1 + n] - u[:, None]) / den_r.clamp_min(1e-300), 0.0)
        B = left * B[:, :n] + right * B[:, 1:n + 1]
    return B


def cubic_spline_weights(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(len(u), len(x))`` matrix mapping samples at ``x`` to the interpolating cubic
    spline evaluated at ``u`` (float64).

    This is the spline FITPACK's ``regrid`` returns with ``s=0`` (what ``interp2d(kind=
    'cubic')`` fitted on a grid): knots at ``x[2:-2]`` with 4-fold end knots, i.e. the
    not-a-knot interpolant, evaluated with the argument clamped to ``[x[0], x[-1]]`` as
    FITPACK's ``fpbisp`` does."""
    if len(x) < 4:
        raise ValueError(f"cubic interpolation needs at least 4 samples per axis, got {len(x)}")
    knots = torch.cat([x[:1].repeat(4), x[2:-2], x[-1:].repeat(4)])
    A = bspline_basis(knots, x)
    E = bspline_basis(knots, u.clamp(x[0], x[-1]))
    return torch.linalg.solve(A.T, E.T).T


def _interpolate_offsets(table: torch.Tensor, src_size: int, dst_size: int) -> torch.Tensor:
    src, dst = 2 * src_size - 1, 2 * dst_size - 1
    q = geometric_ratio(src // 2, dst // 2)
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)
    t = dst // 2
    u = torch.arange(-t, t + 0.1, 1.0, dtype=torch.float64)
    Wm = cubic_spline_weights(x, u)                                    # (dst, src)
    # The reference casts each head's grid to float32 before fitting.
    z = table.detach().float().cpu().double().T.reshape(-1, src, src)  # (heads, rows, cols)
    out = Wm @ z @ Wm.T                                                # (heads, dst, dst)
    return out.reshape(-1, dst * dst).T.to(torch.float32).contiguous()


def resize(table: torch.Tensor, dst_size: int, extra: int = 0) -> torch.Tensor:
    """A ``((2S-1)^2 + extra, heads)`` table for window / grid ``dst_size``, in ``table``'s
    dtype: the offset part by the geometric-progression bicubic spline (computed from the
    float32 values, as the reference), the ``extra`` rows (BEiT's class-token rows) kept
    as they are. The same size returns ``table`` itself."""
    if dst_size < 1:
        raise ValueError(f"cannot resize a relative position bias table to size {dst_size}")
    src_size = table_size(table.shape[0], extra)
    if src_size == dst_size:
        return table
    offsets = _interpolate_offsets(table[:table.shape[0] - extra], src_size, dst_size)
    offsets = offsets.to(device=table.device, dtype=table.dtype)
    return torch.cat([offsets, table[table.shape[0] - extra:]], dim=0) if extra else offsets
