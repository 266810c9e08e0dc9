"""VICReg loss against an independent float64 implementation of the official formula (method.md).

The reference below is written from the formula, not from the library: numpy float64 for the
values, and the same formula in torch float64 (explicit sums, no library helpers) for gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sjea_tools import stacked_vicreg_loss, vicreg_loss

EPS = 1e-4
SHAPES = [(2, 1), (2, 5), (3, 1), (7, 4), (16, 32), (5, 64)]


# --- the reference ------------------------------------------------------------------------------

def ref_terms_np(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """(invariance, variance, covariance) of official VICReg, float64, loops where it helps clarity."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    invariance = ((x - y) ** 2).sum() / (n * d)

    def var_and_cov(a):
        c = a - a.sum(axis=0) / n
        unbiased_var = (c**2).sum(axis=0) / (n - 1)
        std = np.sqrt(unbiased_var + EPS)
        var_term = np.maximum(0.0, 1.0 - std).sum() / d
        cov = np.zeros((d, d))
        for i in range(d):
            for j in range(d):
                cov[i, j] = (c[:, i] * c[:, j]).sum() / (n - 1)
        off = sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
        return var_term, off / d

    vx, cx = var_and_cov(x)
    vy, cy = var_and_cov(y)
    return {"invariance": invariance, "variance": vx / 2 + vy / 2, "covariance": cx + cy}


def ref_total_np(x, y, sim=25.0, std=25.0, cov=1.0) -> float:
    t = ref_terms_np(x, y)
    return sim * t["invariance"] + std * t["variance"] + cov * t["covariance"]


def ref_total_torch64(x: torch.Tensor, y: torch.Tensor, sim=25.0, std=25.0, cov=1.0) -> torch.Tensor:
    """The same formula in torch float64, for autograd gradients."""
    n, d = x.shape
    invariance = ((x - y) ** 2).sum() / (n * d)

    def var_and_cov(a):
        c = a - a.sum(dim=0, keepdim=True) / n
        s = torch.sqrt((c**2).sum(dim=0) / (n - 1) + EPS)
        var_term = torch.clamp(1.0 - s, min=0.0).sum() / d
        cm = (c.unsqueeze(2) * c.unsqueeze(1)).sum(dim=0) / (n - 1)  # (d, d)
        mask = 1.0 - torch.eye(d, dtype=a.dtype)
        return var_term, ((cm * mask) ** 2).sum() / d

    vx, cx = var_and_cov(x)
    vy, cy = var_and_cov(y)
    return sim * invariance + std * (vx / 2 + vy / 2) + cov * (cx + cy)


def sample_pair(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated batches whose columns have std both below and above 1 (relu active and not)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.2, 2.0, d)
    x = rng.normal(size=(n, d)) * scales + rng.normal(size=d)
    y = x + 0.3 * rng.normal(size=(n, d))
    # correlate columns so the covariance term is not trivially small
    if d > 1:
        x[:, 0] += 0.8 * x[:, -1]
    return x, y


def test_reference_agrees_with_itself_in_numpy_and_torch():
    x, y = sample_pair(6, 3, seed=0)
    a = ref_total_np(x, y, 3.0, 5.0, 7.0)
    b = ref_total_torch64(torch.from_numpy(x), torch.from_numpy(y), 3.0, 5.0, 7.0).item()
    assert a == pytest.approx(b, rel=1e-12)


# --- each term and the total ----------------------------------------------------------------------

@pytest.mark.parametrize("n,d", SHAPES)
def test_terms_and_total_match_float64_reference(n, d):
    x, y = sample_pair(n, d, seed=n * 100 + d)
    got = vicreg_loss(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    ref = ref_terms_np(x.astype(np.float32), y.astype(np.float32))
    for name in ("invariance", "variance", "covariance"):
        assert getattr(got, name).item() == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name
    assert got.total.item() == pytest.approx(ref_total_np(x.astype(np.float32), y.astype(np.float32)), rel=1e-4, abs=1e-6)
    assert got.total.dtype == torch.float32 and got.total.dim() == 0


def test_variance_term_is_active_and_inactive():
    """Columns with std >= 1 contribute nothing; with std near 0 nearly 1/2 per view."""
    rng = np.random.default_rng(1)
    wide = rng.normal(size=(64, 3)) * 10.0
    got = vicreg_loss(torch.from_numpy(wide).float(), torch.from_numpy(wide).float())
    assert got.variance.item() == 0.0
    assert got.invariance.item() == 0.0
    const = np.ones((8, 3))
    got = vicreg_loss(torch.from_numpy(const).float(), torch.from_numpy(const).float())
    # std = sqrt(0 + 1e-4) = 0.01 per column -> relu(1 - 0.01) = 0.99, averaged, halved per view
    assert got.variance.item() == pytest.approx(0.99, rel=1e-6)
    assert got.covariance.item() == 0.0


def test_d_equal_one_has_no_covariance():
    x, y = sample_pair(9, 1, seed=3)
    got = vicreg_loss(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.covariance.item() == 0.0
    assert got.total.item() == pytest.approx(ref_total_np(x, y), rel=1e-4)


def test_n_equal_two_uses_unbiased_variance():
    # Two rows (0, 0) and (a, b): unbiased variance of a column is (a/2)^2 * 2 / 1 = a^2 / 2.
    x = torch.tensor([[0.0, 0.0], [0.5, 3.0]])
    y = torch.zeros(2, 2) + torch.tensor([[0.0, 0.0], [0.5, 3.0]])
    got = vicreg_loss(x, y)
    std = np.sqrt(np.array([0.25 / 2, 9.0 / 2]) + EPS)
    expected_var = np.maximum(0, 1 - std).mean()  # identical views: (v/2 + v/2)
    assert got.variance.item() == pytest.approx(expected_var, rel=1e-5)
    # off-diagonal cov = sum(c_i * c_j) / 1 = 2 * (0.25 * 1.5) = 0.75; squared twice, / d=2, both views
    assert got.covariance.item() == pytest.approx(2 * (2 * 0.75**2) / 2, rel=1e-5)


@pytest.mark.parametrize("coeffs", [(1.0, 1.0, 1.0), (0.0, 25.0, 0.04), (10.0, 0.0, 3.5), (2.5, 7.0, 0.0)])
def test_custom_coefficients(coeffs):
    x, y = sample_pair(12, 6, seed=7)
    got = vicreg_loss(torch.from_numpy(x).float(), torch.from_numpy(y).float(), *coeffs)
    assert got.total.item() == pytest.approx(ref_total_np(x, y, *coeffs), rel=1e-4, abs=1e-6)
    # the returned terms stay unweighted whatever the coefficients
    ref = ref_terms_np(x, y)
    assert got.invariance.item() == pytest.approx(ref["invariance"], rel=1e-4)
    assert got.covariance.item() == pytest.approx(ref["covariance"], rel=1e-4)


def test_default_coefficients_are_the_official_25_25_1():
    x, y = sample_pair(10, 4, seed=11)
    got = vicreg_loss(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.total.item() == pytest.approx(ref_total_np(x, y, 25.0, 25.0, 1.0), rel=1e-4)
    assert got.total.item() != pytest.approx(ref_total_np(x, y, 1.0, 1.0, 1.0), rel=1e-2)


def test_half_precision_inputs_are_computed_in_float32():
    x, y = sample_pair(32, 8, seed=5)
    xb, yb = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(y).to(torch.bfloat16)
    got = vicreg_loss(xb, yb)
    ref = ref_total_np(xb.double().numpy(), yb.double().numpy())
    assert got.total.dtype == torch.float32
    assert got.total.item() == pytest.approx(ref, rel=1e-4)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="vicreg_loss needs two"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        vicreg_loss(torch.zeros(4), torch.zeros(4))


def test_a_single_row_is_refused_instead_of_returning_nan():
    # variance and covariance divide by N - 1: one row would silently give inf/NaN and poison training
    with pytest.raises(ValueError, match="2 rows"):
        vicreg_loss(torch.randn(1, 3), torch.randn(1, 3))


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(2, 1), (2, 3), (5, 1), (8, 6), (16, 20)])
@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_gradients_match_float64_reference(n, d, coeffs):
    x, y = sample_pair(n, d, seed=n + 31 * d)
    x32 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    y32 = torch.tensor(y, dtype=torch.float32, requires_grad=True)
    vicreg_loss(x32, y32, *coeffs).total.backward()
    x64 = torch.tensor(x32.detach().numpy(), dtype=torch.float64, requires_grad=True)
    y64 = torch.tensor(y32.detach().numpy(), dtype=torch.float64, requires_grad=True)
    ref_total_torch64(x64, y64, *coeffs).backward()
    scale = max(1.0, x64.grad.abs().max().item(), y64.grad.abs().max().item())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(y32.grad.double(), y64.grad, rtol=1e-4, atol=1e-5 * scale)
    assert x64.grad.abs().sum() > 0  # the comparison is not between two zero tensors


# --- the stacked loss ---------------------------------------------------------------------------

def test_stacked_loss_uses_per_level_weights_and_coefficients():
    pairs = [sample_pair(10, 6, seed=1), sample_pair(10, 4, seed=2), sample_pair(10, 1, seed=3)]
    sims, stds, covs = [25.0, 5.0, 1.0], [25.0, 10.0, 2.0], [1.0, 0.04, 3.0]
    weights = [1.0, 0.5, 2.0]
    z1s = [torch.tensor(a, dtype=torch.float32) for a, _ in pairs]
    z2s = [torch.tensor(b, dtype=torch.float32) for _, b in pairs]
    total, per_level = stacked_vicreg_loss(z1s, z2s, sims, stds, covs, weights)
    refs = [ref_total_np(a, b, s, v, c) for (a, b), s, v, c in zip(pairs, sims, stds, covs)]
    assert len(per_level) == 3
    for terms, ref in zip(per_level, refs):
        assert terms.total.item() == pytest.approx(ref, rel=1e-4)
    assert total.item() == pytest.approx(sum(w * r for w, r in zip(weights, refs)), rel=1e-4)


def test_stacked_loss_zero_weight_level_gets_no_gradient():
    pairs = [sample_pair(8, 5, seed=4), sample_pair(8, 3, seed=5)]
    z1s = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a, _ in pairs]
    z2s = [torch.tensor(b, dtype=torch.float32, requires_grad=True) for _, b in pairs]
    total, _ = stacked_vicreg_loss(z1s, z2s, [25.0] * 2, [25.0] * 2, [1.0] * 2, [1.0, 0.0])
    total.backward()
    assert z1s[0].grad.abs().sum() > 0
    assert z1s[1].grad is None or z1s[1].grad.abs().sum() == 0
    # and the weighted level's gradient equals the reference gradient of that level alone
    x64 = torch.tensor(z1s[0].detach().numpy(), dtype=torch.float64, requires_grad=True)
    ref_total_torch64(x64, torch.tensor(pairs[0][1], dtype=torch.float32).double()).backward()
    torch.testing.assert_close(z1s[0].grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


def test_stacked_loss_with_one_level_equals_vicreg():
    x, y = sample_pair(6, 3, seed=9)
    a, b = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    total, per_level = stacked_vicreg_loss([a], [b], [25.0], [25.0], [1.0], [1.0])
    assert total.item() == pytest.approx(vicreg_loss(a, b).total.item(), rel=1e-6)
    assert total.item() == pytest.approx(ref_total_np(x, y), rel=1e-4)
