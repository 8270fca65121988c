"""Geometry metrics against closed forms and brute force: simplex ETF, NC1, alignment/uniformity, spectrum."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dual_emc2.metrics.geometry import (
    alignment,
    class_means,
    effective_rank,
    encode_all,
    etf_distance,
    etf_shape,
    geometry_metrics,
    nc1,
    numerical_rank,
    plot_spectra,
    singular_values,
    uniformity,
)


def simplex_etf(k: int, d: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """K unit-norm means with pairwise cosine −1/(K−1), rotated into R^d: √(K/(K−1)) (I − 11ᵀ/K) Uᵀ."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    m = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k) @ u.t()
    return scale * m


def test_etf_distance_is_zero_for_a_simplex_etf_and_positive_otherwise() -> None:
    m = simplex_etf(6, 20, scale=3.0)
    cos = F.normalize(m, dim=1) @ F.normalize(m, dim=1).t()
    assert torch.allclose(cos[~torch.eye(6, dtype=torch.bool)], torch.full((30,), -1 / 5, dtype=torch.float64))
    assert etf_distance(m) == pytest.approx(0.0, abs=1e-12)
    assert etf_distance(m, center=False) == pytest.approx(0.0, abs=1e-12)  # an ETF is already centred
    shifted = m + torch.randn(20, dtype=torch.float64)
    assert etf_distance(shifted) == pytest.approx(0.0, abs=1e-12)  # centring removes a global shift
    assert etf_distance(shifted, center=False) > 0.1
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in etf_shape(m).values())
    # not an ETF: random means, unequal norms, a squeezed angle
    assert etf_distance(torch.randn(6, 20, dtype=torch.float64)) > 0.1
    uneven = m * torch.linspace(1, 2, 6, dtype=torch.float64)[:, None]
    assert etf_distance(uneven) > 0.05 and etf_shape(uneven)["equinorm"] > 0.1
    squeezed = m.clone()
    squeezed[0] = 0.5 * (m[0] + m[1])
    assert etf_distance(squeezed) > 0.05 and etf_shape(squeezed)["max_angle"] > 0.01
    # orthonormal means: an ETF once centred (a known fact), not as raw vectors
    eye = torch.eye(6, 20, dtype=torch.float64)
    assert etf_distance(eye) == pytest.approx(0.0, abs=1e-12)
    a, b = 1 / math.sqrt(6), 1 / math.sqrt(5)  # Gram I/‖I‖_F against (I − 11ᵀ/6)/√5, entry by entry
    closed = math.sqrt(6 * (a - b * 5 / 6) ** 2 + 30 * (b / 6) ** 2)
    assert etf_distance(eye, center=False) == pytest.approx(closed, rel=1e-12) and closed > 0.4


def test_nc1_brute_force_and_collapse() -> None:
    g = torch.Generator().manual_seed(1)
    k, per, d = 4, 25, 6
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(k).repeat_interleave(per)
    x = means[y] + 0.5 * torch.randn(k * per, d, generator=g, dtype=torch.float64)
    # brute force with numpy, sample by sample
    X, Y = x.numpy(), y.numpy()
    mu = np.stack([X[Y == c].mean(0) for c in range(k)])
    sw = sum(np.outer(X[i] - mu[Y[i]], X[i] - mu[Y[i]]) for i in range(len(X))) / len(X)
    mg = mu.mean(0)
    sb = sum(np.outer(mu[c] - mg, mu[c] - mg) for c in range(k)) / k
    assert nc1(x, y) == pytest.approx(np.trace(sw @ np.linalg.pinv(sb)) / k, rel=1e-9)
    assert torch.allclose(class_means(x, y)[1], torch.from_numpy(mu))
    assert nc1(means[y], y) == pytest.approx(0.0, abs=1e-12)  # every class collapsed to its mean
    assert nc1(means[y] + 0.01 * torch.randn(k * per, d, generator=g, dtype=torch.float64), y) < nc1(x, y)


def test_alignment_and_uniformity_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    z1 = F.normalize(torch.randn(30, 5, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(z1 + 0.3 * torch.randn(30, 5, generator=g, dtype=torch.float64), dim=1)
    assert alignment(z1, z2) == pytest.approx(sum(float((a - b).norm() ** 2) for a, b in zip(z1, z2)) / 30)
    assert alignment(z1, z2, alpha=1) == pytest.approx(sum(float((a - b).norm()) for a, b in zip(z1, z2)) / 30)
    pairs = [math.exp(-2 * float((z1[i] - z1[j]).norm() ** 2)) for i in range(30) for j in range(i + 1, 30)]
    assert uniformity(z1) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-10)
    # K points of a simplex ETF on the sphere: every squared distance is 2 + 2/(K−1)
    k = 7
    assert uniformity(simplex_etf(k, 10)) == pytest.approx(-2 * (2 + 2 / (k - 1)), rel=1e-10)
    # collapsed features are the least uniform possible (log e^0 = 0)
    assert uniformity(z1[:1].repeat(10, 1)) == pytest.approx(0.0, abs=1e-12)


def test_spectrum_and_effective_rank() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    sv = singular_values(x)
    cov = np.cov(x.numpy().T, bias=True)
    assert np.allclose(np.sort(sv.numpy() ** 2)[::-1], np.sort(np.linalg.eigvalsh(cov))[::-1])
    low = x[:, :3] @ torch.randn(3, 12, generator=g, dtype=torch.float64)  # lies in 3 dimensions
    assert numerical_rank(singular_values(low)) == 3
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert effective_rank(p * 7) == pytest.approx(math.exp(-float((p * p.log()).sum())))


def test_geometry_metrics_of_a_neural_collapse_configuration() -> None:
    k = 10
    means = simplex_etf(k, 32)
    y = torch.arange(k).repeat(20)
    m = geometry_metrics(means[y], y, unit=True)
    assert m["etf_distance"] == pytest.approx(0.0, abs=1e-10) and m["nc1"] == pytest.approx(0.0, abs=1e-10)
    assert m["effective_rank"] == pytest.approx(k - 1, rel=1e-9) and m["rank"] == k - 1  # NC has rank K − 1
    collapsed = geometry_metrics(means[y] * torch.tensor([1.0, 0.0]).repeat(16), y)  # half the dims zeroed
    assert collapsed["effective_rank"] < k - 1 and collapsed["etf_distance"] > 0.05
    assert set(m) == {"effective_rank", "rank", "top_sv_share", "mean_norm", "uniformity", "nc1", "etf_distance",
                      "equinorm", "equiangular", "max_angle"}
    assert "nc1" not in geometry_metrics(means[y])


def test_bad_input_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"features must be a \[N, d\] tensor"):
        geometry_metrics(torch.randn(5))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(4,\)"):
        nc1(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        geometry_metrics(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        alignment(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least two classes"):
        nc1(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_encode_all_and_spectrum_png(tmp_path) -> None:
    data = [(torch.arange(4), torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    w = torch.randn(3, 2)
    (h, z), y = encode_all(lambda x: (x, x @ w), data, "cpu")
    assert h.shape == (12, 3) and z.shape == (12, 2) and y.tolist() == [0, 1, 0, 1] * 3
    assert torch.allclose(z, h @ w)
    out = plot_spectra({"a": singular_values(h), "b": singular_values(z)}, tmp_path / "spec.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
