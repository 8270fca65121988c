"""Geometry of a representation: alignment and uniformity (Wang & Isola, ICML 2020), neural collapse (Papyan, Han &
Donoho, PNAS 2020; the collapse analysis of Jiang et al.) and the singular-value spectrum / effective rank
(dimensional collapse).

* alignment  L_align = E_(x,x⁺) ‖f(x) − f(x⁺)‖₂^α                      (Wang & Isola eq. 4, α = 2)
* uniformity L_unif  = log E_{x≠y} exp(−t ‖f(x) − f(y)‖₂²)              (Wang & Isola eq. 5, t = 2)
* NC1 = (1/K) tr(Σ_W Σ_B⁺): within-class covariance Σ_W against the between-class covariance Σ_B of the class
  means μ_k around the global mean μ_G (Papyan et al. NC1); 0 when every class collapses to its mean.
* ETF distance = ‖ MMᵀ / ‖MMᵀ‖_F − (I_K − 11ᵀ/K) / √(K−1) ‖_F with M = [μ_k − μ_G] (Papyan et al. NC2): 0 exactly
  when the centred class means form a simplex equiangular tight frame (equal norms, pairwise cosines −1/(K−1)).
  Without centring (``center=False``) the raw means are compared with the ETF Gram, as for features on a sphere.
* spectrum: singular values σ_1 ≥ … of the centred feature matrix / √N (square roots of the covariance
  eigenvalues); effective rank exp(−Σ p_i log p_i), p = σ/Σσ (Roy & Vetterli 2007); ``rank`` counts σ_i > 10⁻³ σ_1.
  Dimensional collapse (Jing et al. 2022; discussed by Jiang et al. for SCL/HSCL) is a spectrum that falls to ~0 well
  before the feature dimension (for K classes, below the K − 1 dimensions of a simplex ETF).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def _features(x: Tensor, name: str = "features") -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [N, d] tensor with N >= 2, got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x.detach().double()


def _labels(y: Tensor, n: int) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != (n,) or y.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got "
                         f"{(y.dtype, tuple(y.shape)) if isinstance(y, Tensor) else type(y).__name__}")
    return y.detach().long()


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """E ‖z1_i − z2_i‖^α over positive pairs (rows of ``z1``, ``z2``); Wang & Isola eq. 4."""
    a, b = _features(z1, "z1"), _features(z2, "z2")
    if a.shape != b.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """log of the mean over pairs i < j of exp(−t ‖z_i − z_j‖²); Wang & Isola eq. 5 (use unit-norm features)."""
    d2 = torch.pdist(_features(z, "z")).pow(2)
    return float(torch.logsumexp(-t * d2, dim=0) - math.log(d2.numel()))


def class_means(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(classes [K], means [K, d]) of the classes present in ``labels``."""
    x = _features(feats)
    y = _labels(labels, x.shape[0])
    classes, inverse = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=len(classes)).to(x.dtype)
    return classes, sums / counts[:, None]


def nc1(feats: Tensor, labels: Tensor) -> float:
    """(1/K) tr(Σ_W Σ_B⁺) (Papyan et al.): within-class variability relative to the spread of the class means."""
    x = _features(feats)
    y = _labels(labels, x.shape[0])
    classes, means = class_means(x, y)
    if len(classes) < 2:
        raise ValueError("nc1 needs at least two classes")
    inverse = torch.unique(y, return_inverse=True)[1]
    within = x - means[inverse]
    sigma_w = within.t() @ within / x.shape[0]
    centred = means - means.mean(dim=0)
    sigma_b = centred.t() @ centred / len(classes)
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / len(classes))


def etf_distance(means: Tensor, center: bool = True) -> float:
    """‖ MMᵀ/‖MMᵀ‖_F − (I − 11ᵀ/K)/√(K−1) ‖_F for class means M [K, d] (centred on their mean if ``center``)."""
    m = _features(means, "class means")
    k = m.shape[0]
    if center:
        m = m - m.mean(dim=0)
    gram = m @ m.t()
    norm = gram.norm()
    if norm == 0:
        raise ValueError("etf_distance: all class means coincide")
    etf = (torch.eye(k, dtype=m.dtype) - 1.0 / k) / math.sqrt(k - 1)
    return float((gram / norm - etf).norm())


def etf_shape(means: Tensor, center: bool = True) -> dict[str, float]:
    """Papyan et al.'s NC2 details: ``equinorm`` = std/mean of the class-mean norms; ``equiangular`` = std of the
    pairwise cosines; ``max_angle`` = mean |cos + 1/(K−1)| (0 for a simplex ETF)."""
    m = _features(means, "class means")
    k = m.shape[0]
    if center:
        m = m - m.mean(dim=0)
    norms = m.norm(dim=1)
    cos = F.normalize(m, dim=1) @ F.normalize(m, dim=1).t()
    off = cos[~torch.eye(k, dtype=torch.bool)]
    return {"equinorm": float(norms.std() / norms.mean()), "equiangular": float(off.std()),
            "max_angle": float((off + 1.0 / (k - 1)).abs().mean())}


def singular_values(feats: Tensor, center: bool = True) -> Tensor:
    """σ_1 ≥ … ≥ σ_min(N,d) of the (centred) features / √N: square roots of the covariance eigenvalues."""
    x = _features(feats)
    if center:
        x = x - x.mean(dim=0)
    return torch.linalg.svdvals(x / math.sqrt(x.shape[0]))


def effective_rank(sv: Tensor) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli 2007): between 1 and the number of non-zero singular values."""
    s = sv.double().clamp(min=0)
    if float(s.sum()) == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(sv: Tensor, rtol: float = 1e-3) -> int:
    """Number of singular values above ``rtol`` × the largest."""
    return int((sv > rtol * sv.max()).sum()) if sv.numel() else 0


def geometry_metrics(feats: Tensor, labels: Tensor | None = None, *, unit: bool = False, center_etf: bool = True,
                     max_pairs: int = 4096, seed: int = 0) -> dict[str, float]:
    """All label-free and (with ``labels``) neural-collapse metrics of one feature set, as a flat dict:
    ``effective_rank``, ``rank``, ``top_sv_share`` (σ_1/Σσ), ``mean_norm``, ``uniformity`` (on the first
    ``max_pairs`` rows of a seeded permutation, after L2 normalisation unless ``unit`` says they already are),
    ``nc1``, ``etf_distance``, ``equinorm``, ``equiangular``, ``max_angle``."""
    x = _features(feats)
    sv = singular_values(x)
    out = {"effective_rank": effective_rank(sv), "rank": float(numerical_rank(sv)),
           "top_sv_share": float(sv[0] / sv.sum()) if float(sv.sum()) > 0 else 1.0,
           "mean_norm": float(x.norm(dim=1).mean())}
    g = torch.Generator().manual_seed(seed)
    sub = x[torch.randperm(x.shape[0], generator=g)[:max_pairs]]
    out["uniformity"] = uniformity(sub if unit else F.normalize(sub, dim=1))
    if labels is not None:
        _, means = class_means(x, labels)
        out["nc1"] = nc1(x, labels)
        out["etf_distance"] = etf_distance(means, center=center_etf)
        out |= etf_shape(means, center=center_etf)
    return out


@torch.no_grad()
def encode_all(encode: Callable[[Tensor], Tensor | tuple[Tensor, ...]], loader: Iterable,
               device: str | torch.device) -> tuple[list[Tensor], Tensor]:
    """Run ``encode`` (one tensor or a tuple, e.g. ``ContrastiveEncoder.encode`` → (h, z)) over a loader of
    ``(index, images, labels)``; returns the per-output feature lists concatenated ([N, d_k] each, CPU float32) and
    the labels [N].  Put modules in eval mode first."""
    outs: list[list[Tensor]] = []
    labels = []
    for _, x, y in loader:
        res = encode(x.to(device))
        res = res if isinstance(res, tuple) else (res,)
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(r.detach().float().cpu())
        labels.append(torch.as_tensor(y).long())
    if not outs:
        raise ValueError("encode_all: the loader yielded no batch")
    return [torch.cat(o) for o in outs], torch.cat(labels)


def plot_spectra(spectra: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """PNG of σ_i / σ_1 (log scale) against i for each named spectrum; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, sv in spectra.items():
        s = sv.double().cpu()
        s = (s / s[0]).clamp(min=1e-12)
        ax.semilogy(range(1, len(s) + 1), s.numpy(), marker=".", label=f"{name} (eff. rank {effective_rank(sv):.1f})")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 (centred features)")
    ax.set_ylim(1e-6, 1.5)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
