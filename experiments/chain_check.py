#!/usr/bin/env python
"""Chain check at fixed scores: does each EMC² state update sample softmax(β s) over all of D_neg?

No network.  One anchor with N fixed negative scores s (default N = 1,000, s ~ N(0, 0.3²) clipped to [−1, 1], seeded),
target π = softmax(β s) over the N negatives.  ``--chains`` independent chains (one row each in
:func:`dual_emc2.loss.estimators.emc2.chain.mh_visit_counts`, vectorised) keep a state z that persists across visits.
Every visit draws, per chain, a batch C of c candidates uniformly without replacement from the N (independent of z) and
runs one update from the stored state:

  batch          R = c M-H steps proposing uniformly from C only (Algorithm 1 of Yau et al.), P = c // 2 burn-in,
                 exact score of the stored state; once the chain leaves z it cannot return within the visit.
  pool           the same with proposals uniform over A = C ∪ {z} (z proposable: column −1).  Exact.
  permuted_scan  the same with the valid columns in a fresh random order per sweep (not exactly invariant).
  rao_blackwell  weights softmax(β s) over A (the state's term included), next state one exact draw from it
                 (:func:`dual_emc2.loss.estimators.emc2.pool_logits`,
                 :func:`~dual_emc2.loss.estimators.emc2.gumbel_argmax`).

The counted distribution of a visit is, for the M-H variants, its post-burn-in visit counts / (R − P) (in-batch
columns mapped back to negative ids, ``stay`` to the state's id) and, for Rao–Blackwell, its weight vector over A.
Summed over chains and visits this gives a histogram over the N negatives whose total variation
TV = ½ Σ |freq − π| is reported after 75, 150, 300, 600 and 1,200 visits (counted from the first visit; every chain
starts without a state, ``init_score = −inf``).  All variants of one (c, β) see the same batches (common random
numbers; the batch is independent of each chain's state, as the maths requires).

Monte Carlo floor: a histogram of finitely many samples has TV > 0 even for an exact sampler.  Reported beside the
variants: ``iid (same n)``, the TV of as many i.i.d. draws from π as the M-H variants count (chains · visits · (R − P));
``iid (1/visit)``, the TV of chains · visits i.i.d. draws (one per chain and visit, the natural reference for the
Rao–Blackwell update and for the highly correlated within-visit M-H samples); and per variant a split-half noise
estimate, TV(histogram of chains 1..n/2, histogram of chains n/2+1..n) / 2, which includes the chains' own
autocorrelation (independent chains, so the two halves are independent).  An exact variant's TV should be ≈ its
split-half noise and fall like 1/√visits; a biased one levels off at a floor above it.

Distance from the in-batch softmax: the same batches also accumulate the in-batch softmax (softmax(β s) over C only,
what InfoNCE-style in-batch weighting samples), reported as its own row (its TV from π is the bias of in-batch
weighting), and each variant's histogram is compared with it (``TV to in-batch-softmax hist.``): a procedure pulled
toward the batch sits between the two.  ``TV visits a–b`` is the TV of the visits since the previous checkpoint only
(the second half when the checkpoints double), free of the start-up transient of the chains.  Per visit, the mean TV
of each procedure's weights from the pool softmax (softmax over A; zero for Rao–Blackwell by construction, the
within-visit sampling noise of R − P counted M-H steps otherwise) and from the in-batch softmax are in the JSON.

    python experiments/chain_check.py --threads 1   # c ∈ {6, 62}, β ∈ {5, 14.28}: ~16 min wall on a shared 2-core CPU
    python experiments/chain_check.py --smoke              # seconds (CI)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import default_out, describe_machine, format_table, machine_info, pyplot, save_figure, write_json
from torch import Tensor

from dual_emc2.loss.estimators.emc2 import gumbel_argmax, pool_logits
from dual_emc2.loss.estimators.emc2.chain import mh_visit_counts

VARIANTS = ("batch", "pool", "permuted_scan", "rao_blackwell")
MH_VARIANTS = ("batch", "pool", "permuted_scan")
REFERENCES = ("in-batch softmax", "iid (same n)", "iid (1/visit)")


def fixed_scores(n: int, spread: float, seed: int) -> Tensor:
    """N negative scores s ~ N(0, spread²) clipped to [−1, 1] (cosine similarities), float32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * spread).clamp(-1.0, 1.0)


def tv(p: Tensor, q: Tensor) -> float:
    """Total variation ½ Σ |p − q| of two distributions over the same support (normalised here)."""
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    return float(0.5 * (p - q).abs().sum())


def iid_tv(target: Tensor, n: int, rng: np.random.Generator) -> float:
    """TV between the empirical distribution of ``n`` i.i.d. draws from ``target`` and ``target`` (multinomial counts
    drawn directly, O(N) whatever n)."""
    p = target.double().numpy()
    counts = rng.multinomial(n, p / p.sum())
    return float(0.5 * np.abs(counts / n - p).sum())


def run_setting(s: Tensor, c: int, beta: float, *, chains: int, checkpoints: list[int], variants: list[str],
                seed: int) -> dict[str, Any]:
    """All variants of one (c, β): histograms at every checkpoint, TV against π, split-half noise and per-visit TVs."""
    N = s.numel()
    R, P = c, c // 2
    target = torch.softmax(beta * s.double(), 0)
    hard = torch.argsort(s, descending=True)[:max(1, N // 100)]
    g_batch = torch.Generator().manual_seed(seed)
    gens = {v: torch.Generator().manual_seed(seed * 101 + 7 + i) for i, v in enumerate(VARIANTS)}
    half = (torch.arange(chains) >= chains // 2).to(torch.int64)  # chain → half 0 / 1 for the split-half noise
    state = {v: torch.full((chains,), -1, dtype=torch.int64) for v in variants}
    hist = {v: torch.zeros(2 * N, dtype=torch.float64) for v in variants}  # [half 0 | half 1]
    hist_inb = torch.zeros(N, dtype=torch.float64)  # Σ over chains and visits of the in-batch softmax
    snap = {v: torch.zeros(N, dtype=torch.float64) for v in [*variants, "in-batch softmax"]}  # at the last checkpoint
    tv_batch_sum = {v: 0.0 for v in variants}  # Σ over chains and visits of per-visit TV from the in-batch softmax
    tv_pool_sum = {v: 0.0 for v in variants}
    accept_sum = {v: 0.0 for v in variants}
    out: dict[str, Any] = {v: {"visits": [], "tv": [], "tv_window": [], "noise": [], "tv_from_in_batch_softmax": [],
                               "hardest_1pct_mass": []} for v in variants}
    out["in-batch softmax"] = {"visits": [], "tv": [], "tv_window": [], "hardest_1pct_mass": []}
    all_true = torch.ones(chains, c, dtype=torch.bool)
    rows = torch.arange(chains)
    t0 = time.perf_counter()
    last = max(checkpoints)
    for t in range(1, last + 1):
        cand = torch.rand(chains, N, generator=g_batch).topk(c, dim=1).indices  # c distinct negatives per chain
        sc = s[cand]  # [chains, c]
        zero = torch.zeros(chains, 1, dtype=torch.float64)  # no in-batch mass on an out-of-batch state
        in_batch_softmax = torch.cat([torch.softmax(beta * sc.double(), 1), zero], 1)
        hist_inb.index_add_(0, cand.flatten(), in_batch_softmax[:, :c].flatten())
        for v in variants:
            z = state[v]
            hit = cand == z[:, None]
            col = torch.where(hit.any(1), hit.to(torch.int64).argmax(1), torch.full_like(z, -1))
            has = z >= 0
            init_score = torch.where(has, s[z.clamp(min=0)], torch.full((chains,), float("-inf")))
            in_pool = has & (col < 0)  # the state is an extra, out-of-batch member of A
            logits = pool_logits(sc, all_true, init_score, in_pool, beta).double()  # [chains, c + 1]
            pool_softmax = torch.softmax(logits, 1)
            if v == "rao_blackwell":
                w = pool_softmax
                pick = gumbel_argmax(logits, torch.rand(chains, c + 1, generator=gens[v], dtype=torch.float64))
                new = torch.where(pick < c, cand[rows, pick.clamp(max=c - 1)], z)
            else:
                res = mh_visit_counts(sc, beta=beta, steps=R, burn_in=P, init_index=col, init_score=init_score,
                                      proposal=v, generator=gens[v], backend="torch")
                w = torch.cat([res.counts, res.stay[:, None]], 1).double() / (R - P)
                new = torch.where(res.index >= 0, cand.gather(1, res.index.clamp(min=0)[:, None])[:, 0], z)
                accept_sum[v] += float(res.accepted.sum()) / R
            h = hist[v]
            h.index_add_(0, (cand + N * half[:, None]).flatten(), w[:, :c].flatten())
            h.index_add_(0, (z.clamp(min=0) + N * half), w[:, c] * has)  # weight on an out-of-batch state
            tv_batch_sum[v] += float(0.5 * (w - in_batch_softmax).abs().sum())
            tv_pool_sum[v] += float(0.5 * (w - pool_softmax).abs().sum())
            state[v] = new
        if t in checkpoints:
            for v in [*variants, "in-batch softmax"]:
                full = hist_inb if v == "in-batch softmax" else hist[v][:N] + hist[v][N:]
                o = out[v]
                o["visits"].append(t)
                o["tv"].append(tv(full, target))
                o["tv_window"].append(tv(full - snap[v], target))  # visits since the previous checkpoint only
                o["hardest_1pct_mass"].append(float(full[hard].sum() / full.sum()))
                snap[v] = full.clone()
                if v != "in-batch softmax":
                    o["noise"].append(0.5 * tv(hist[v][:N], hist[v][N:]))
                    o["tv_from_in_batch_softmax"].append(tv(full, hist_inb))
    for v in variants:
        out[v]["per_visit_tv_from_batch_softmax"] = tv_batch_sum[v] / (chains * last)
        out[v]["per_visit_tv_from_pool_softmax"] = tv_pool_sum[v] / (chains * last)
        if v in MH_VARIANTS:
            out[v]["accept_rate"] = accept_sum[v] / (chains * last)
    rng = np.random.default_rng(seed + 17)
    n_same = [chains * t * (R - P) for t in checkpoints]
    out["iid (same n)"] = {"visits": checkpoints, "tv": [iid_tv(target, n, rng) for n in n_same], "samples": n_same}
    out["iid (1/visit)"] = {"visits": checkpoints, "tv": [iid_tv(target, chains * t, rng) for t in checkpoints],
                            "samples": [chains * t for t in checkpoints]}
    return {"c": c, "beta": beta, "steps": R, "burn_in": P, "target_ess": float(1.0 / target.square().sum()),
            "hardest_1pct_mass_target": float(target[hard].sum()), "seconds": time.perf_counter() - t0,
            "curves": out}


def plot(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    settings = result["settings"]
    cols = sorted({st["c"] for st in settings})
    betas = sorted({st["beta"] for st in settings})
    fig, axes = plt.subplots(len(betas), len(cols), figsize=(5.2 * len(cols), 4.0 * len(betas)), squeeze=False)
    colors = {"batch": "tab:red", "pool": "tab:blue", "permuted_scan": "tab:orange", "rao_blackwell": "tab:green"}
    for st in settings:
        ax = axes[betas.index(st["beta"])][cols.index(st["c"])]
        for name, cur in st["curves"].items():
            if name == "in-batch softmax":
                ax.plot(cur["visits"], cur["tv"], "s-", color="black", label=name, ms=3, lw=0.8)
            elif name in REFERENCES:
                ax.plot(cur["visits"], cur["tv"], "--" if name == "iid (same n)" else ":", color="grey", label=name)
            else:
                ax.plot(cur["visits"], cur["tv"], "o-", color=colors.get(name), label=name, ms=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"c = {st['c']}, β = {st['beta']:g} (R = {st['steps']}, P = {st['burn_in']})")
        ax.set_xlabel("visits per chain")
        ax.set_ylabel("TV(counted, softmax(βs) over D_neg)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"Chain check at fixed scores: N = {cfg['negatives']}, {cfg['chains']} chains")
    fig.tight_layout()
    return save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--negatives", type=int, default=1000, help="N, size of D_neg")
    ap.add_argument("--spread", type=float, default=0.3, help="scores ~ N(0, spread²) clipped to [−1, 1]")
    ap.add_argument("--chains", type=int, default=2000, help="independent chains (rows)")
    ap.add_argument("--candidates", default="6,62", help="batch sizes c (in-batch candidates per visit)")
    ap.add_argument("--betas", default="5,14.28", help="inverse temperatures β")
    ap.add_argument("--checkpoints", default="75,150,300,600,1200", help="visits at which the TV is reported")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default experiments/results/chain_check[_smoke].json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.negatives, args.chains, args.candidates, args.betas, args.checkpoints = 200, 400, "6", "5", "40,120"
    args.c_list = [int(x) for x in args.candidates.split(",") if x]
    args.beta_list = [float(x) for x in args.betas.split(",") if x]
    args.checkpoint_list = sorted({int(x) for x in args.checkpoints.split(",") if x})
    args.variant_list = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in args.variant_list) or not args.variant_list:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if any(c < 2 or c > args.negatives for c in args.c_list):
        ap.error("--candidates: every c must be in [2, N] (R = c steps, P = c // 2 burn-in)")
    if args.chains < 2 or not args.checkpoint_list or min(args.checkpoint_list) < 1:
        ap.error("--chains must be >= 2 and --checkpoints positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out("chain_check", args.smoke)
    s = fixed_scores(args.negatives, args.spread, args.seed)
    config = {"negatives": args.negatives, "spread": args.spread, "chains": args.chains, "candidates": args.c_list,
              "betas": args.beta_list, "checkpoints": args.checkpoint_list, "variants": args.variant_list,
              "seed": args.seed, "smoke": args.smoke, "steps": "R = c", "burn_in": "P = c // 2"}
    result: dict[str, Any] = {
        "protocol": "chain check at fixed scores: TV of each update's counted distribution from softmax(β s) over "
                    "D_neg, after v visits, beside the Monte Carlo floor",
        "command": " ".join(["python", "experiments/chain_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": config, "machine": machine_info(), "settings": [],
    }
    print(f"machine: {describe_machine(result['machine'])}", flush=True)
    t_all = time.perf_counter()
    for c in args.c_list:
        for beta in args.beta_list:
            st = run_setting(s, c, beta, chains=args.chains, checkpoints=args.checkpoint_list,
                             variants=args.variant_list, seed=args.seed)
            result["settings"].append(st)
            print(f"c = {c:>3}, β = {beta:<6g} target ESS {st['target_ess']:.1f}  ({st['seconds']:.0f} s)", flush=True)
    result["seconds"] = time.perf_counter() - t_all
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    cps = args.checkpoint_list
    rows = []
    for st in result["settings"]:
        for name in [*args.variant_list, *REFERENCES]:
            cur = st["curves"][name]
            rows.append([st["c"], f"{st['beta']:g}", name, *cur["tv"], cur.get("tv_window", [None])[-1],
                         cur.get("noise", [None])[-1], cur.get("tv_from_in_batch_softmax", [None])[-1],
                         cur.get("per_visit_tv_from_pool_softmax")])
    window = f"{cps[-2] + 1}–{cps[-1]}" if len(cps) > 1 else f"1–{cps[-1]}"
    print(f"\nTV from softmax(β s) over D_neg (N = {args.negatives}, {args.chains} chains, R = c, P = c // 2), "
          f"{describe_machine(result['machine'])}, {result['seconds']:.0f} s")
    print(format_table(["c", "β", "variant", *[f"TV @{v}" for v in cps], f"TV visits {window}",
                        f"split-half noise @{cps[-1]}", f"TV to in-batch-softmax hist. @{cps[-1]}",
                        "per-visit TV to pool softmax"], rows, floatfmt=".3g"))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
