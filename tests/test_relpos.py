"""Relative position geometry (mim.nn.relpos) against independent statements: timm's
Swin and BEiT ``relative_position_index`` buffers, and the reference's table resizing
(SimMIM ``utils.remap_pretrained_keys_swin`` / ``_vit``: geometric offsets, interp2d
cubic) re-derived here in numpy and, where installed, with scipy's FITPACK spline.
Also the layering rule: no module of mim/models imports mim.checkpoints."""
import ast
import pathlib

import numpy as np
import pytest
import torch

import mim
from mim.nn import relpos

timm_swin = pytest.importorskip("timm.models.swin_transformer")
timm_beit = pytest.importorskip("timm.models.beit")


# ------------------------------------------------------------------------------- indices


@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_window_index_is_timms_swin_buffer(window):
    attn = timm_swin.WindowAttention(dim=8, num_heads=2, window_size=window)
    assert torch.equal(relpos.window_index(window), attn.relative_position_index)


@pytest.mark.parametrize("grid", [1, 3, 4])
def test_class_token_index_is_timms_beit_buffer(grid):
    want = timm_beit.gen_relative_position_index((grid, grid))
    assert torch.equal(relpos.class_token_index(grid), want)
    rows = relpos.table_rows(grid, relpos.NUM_EXTRA)
    assert rows == (2 * grid - 1) ** 2 + 3 and want.max() == rows - 1


def test_lookup_is_timms_beit_bias():
    """timm's RelativePositionBias gathers the same (heads, N, N) bias from its table."""
    grid, heads = 3, 2
    m = timm_beit.RelativePositionBias(window_size=(grid, grid), num_heads=heads)
    with torch.no_grad():
        m.relative_position_bias_table.normal_(generator=torch.Generator().manual_seed(0))
    got = relpos.lookup(m.relative_position_bias_table, relpos.class_token_index(grid))
    assert got.shape == (1, heads, grid * grid + 1, grid * grid + 1)
    assert torch.equal(got[0], m())


def test_table_size_inverts_rows_and_rejects_others():
    for s in (1, 4, 7):
        assert relpos.table_size(relpos.table_rows(s)) == s
        assert relpos.table_size(relpos.table_rows(s, 3), 3) == s
    with pytest.raises(ValueError, match=r"not \(2S-1\)\^2 \+ 3"):
        relpos.table_size(50, 3)
    with pytest.raises(ValueError, match="not"):
        relpos.table_size(48)


def test_caches_of_the_two_indices_do_not_collide():
    assert relpos.class_token_index(4).shape == (17, 17)
    assert relpos.window_index(4).shape == (16, 16)
    assert relpos.class_token_index(4).shape == (17, 17)


# ------------------------------------------------------- relative position bias interpolation


def reference_positions(src_size, dst_size):
    """The reference's coordinates, re-derived here: bisection for the ratio q, source
    offsets 1, 1+q, 1+q+q^2, ... mirrored around 0; target offsets on the integers."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** (src_size // 2)) / (1.0 - q) > dst_size // 2:
            hi = q
        else:
            lo = q
    dis = np.cumsum([1.0] + [q ** (i + 1) for i in range(src_size // 2 - 1)])
    x = np.concatenate([-dis[::-1], [0.0], dis])
    t = dst_size // 2.0
    return x, np.arange(-t, t + 0.1, 1.0)


def not_a_knot_spline_matrix(x, u):
    """Independent numpy reference: the classic cubic spline with not-a-knot end
    conditions, solved for second derivatives (M_i), evaluated piecewise at ``u`` (clamped
    to the data range). Returns the (len(u), len(x)) linear map from samples to values."""
    n = len(x)
    h = np.diff(x)
    out = np.zeros((len(u), n))
    for j in range(n):
        y = np.zeros(n)
        y[j] = 1.0
        A = np.zeros((n, n))
        b = np.zeros(n)
        for i in range(1, n - 1):
            A[i, i - 1], A[i, i], A[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
            b[i] = 6 * ((y[i + 1] - y[i]) / h[i] - (y[i] - y[i - 1]) / h[i - 1])
        # Third derivative continuous at x[1] and x[n-2].
        A[0, :3] = [h[1], -(h[0] + h[1]), h[0]]
        A[-1, -3:] = [h[-1], -(h[-2] + h[-1]), h[-2]]
        M = np.linalg.solve(A, b)
        for k, v in enumerate(np.clip(u, x[0], x[-1])):
            i = min(np.searchsorted(x, v, side="right") - 1, n - 2)
            a, c = x[i + 1] - v, v - x[i]
            out[k, j] = (M[i] * a ** 3 + M[i + 1] * c ** 3) / (6 * h[i]) \
                + (y[i] / h[i] - M[i] * h[i] / 6) * a + (y[i + 1] / h[i] - M[i + 1] * h[i] / 6) * c
    return out


@pytest.mark.parametrize("src,dst", [(6, 7), (12, 14), (7, 12)])
def test_resize_matches_bicubic_spline_reference(src, dst):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn((2 * src - 1) ** 2, 3, generator=gen)
    out = relpos.resize(table, dst)
    assert out.shape == ((2 * dst - 1) ** 2, 3) and out.dtype == torch.float32
    x, u = reference_positions(2 * src - 1, 2 * dst - 1)
    Wm = not_a_knot_spline_matrix(x, u)
    for h in range(3):
        z = table[:, h].double().numpy().reshape(2 * src - 1, 2 * src - 1)
        ref = (Wm @ z @ Wm.T).reshape(-1)
        assert np.abs(out[:, h].double().numpy() - ref).max() < 1e-5


def test_resize_matches_scipy_fitpack_grid_spline():
    """interp2d(kind='cubic') on a grid ran FITPACK's regrid with s=0, the routine behind
    RectBivariateSpline; the float32 output agrees to rounding (measured ~1e-7)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    table = torch.randn(11 * 11, 4, generator=torch.Generator().manual_seed(1))
    out = relpos.resize(table, 7)
    x, u = reference_positions(11, 13)
    for h in range(4):
        f = interpolate.RectBivariateSpline(x, x, table[:, h].view(11, 11).double().numpy(), kx=3, ky=3, s=0)
        assert np.abs(out[:, h].numpy() - f(u, u).reshape(-1)).max() < 1e-6


def test_interpolation_reproduces_cubic_polynomials():
    """A not-a-knot cubic spline is exact on cubics: a separable cubic sampled on the
    geometric source offsets comes back exactly on the integer target offsets."""
    x, u = reference_positions(11, 13)
    p = lambda v: 0.3 + 0.2 * v - 0.05 * v ** 2 + 0.01 * v ** 3
    z = np.outer(p(x), p(x) + 1)
    table = torch.tensor(z.reshape(-1, 1), dtype=torch.float64)
    out = relpos.resize(table, 7).double().numpy().reshape(13, 13)
    assert np.abs(out - np.outer(p(u), p(u) + 1)).max() < 1e-4   # float32 output
    assert relpos.resize(table, 6) is table


def test_resize_keeps_the_class_rows_and_same_size_is_identity():
    table = torch.randn(relpos.table_rows(4, 3), 2, generator=torch.Generator().manual_seed(2))
    assert relpos.resize(table, 4, extra=3) is table
    out = relpos.resize(table, 6, extra=3)
    assert out.shape == (relpos.table_rows(6, 3), 2)
    assert torch.equal(out[-3:], table[-3:])
    assert torch.equal(out[:-3], relpos.resize(table[:-3], 6))
    with pytest.raises(ValueError, match="size 0"):
        relpos.resize(table, 0, extra=3)


# ------------------------------------------------------------------------------- layering


def test_no_model_module_imports_checkpoints():
    """Layers flow mim/nn -> mim/models -> mim/checkpoints: parse every file under
    mim/models (imports anywhere in it, including inside functions)."""
    root = pathlib.Path(mim.__file__).parent / "models"
    files = sorted(root.rglob("*.py"))
    assert files
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "mim.checkpoints" or n.startswith("mim.checkpoints.") for n in names):
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"mim/models imports mim.checkpoints at {bad}"
