"""Micro-benchmark of the EMC² sampler against the InfoNCE step it rides along with.

For each batch of ``B = 2b`` views (unimodal: each view's candidates are the other ``B - 2`` views, self and positive
excluded) and ``R = B - 2`` M-H steps, times in one run:

  (i)   the chains on the torch loop (:func:`dual_emc2.loss.estimators.emc2.chain.mh_chains_torch`, proposals
        pre-drawn),
  (ii)  the same chains on the fused Triton kernel
        (:func:`dual_emc2.loss.estimators.emc2.chain_triton.mh_chains_triton`) where usable, and checks that both give
        bit-identical results,
  (iii) an InfoNCE loss forward + backward (``F.cross_entropy`` over ``B × B`` logits of d=128 normalised features),
  (iv)  the full :func:`dual_emc2.loss.estimators.emc2.chain.mh_visit_counts` call (proposal drawing + chains,
        backend ``auto``),

reporting medians over repeats after warm-up (CUDA events on GPU, ``time.perf_counter`` on CPU).

    python experiments/bench_sampler.py [--sizes 64,512,...] [--repeats N] [--smoke]
        [--out experiments/results/bench_sampler.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from dual_emc2.loss.estimators.emc2 import chain_triton as mh_triton
from dual_emc2.loss.estimators.emc2.chain import MHResult, draw_mh_proposals, mh_chains_torch, mh_visit_counts

DEFAULT_SIZES = {"cuda": [64, 256, 512, 2048, 8192], "cpu": [64, 256, 512]}
SMOKE_SIZES = [16]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bench_sampler.json"
SMOKE_OUT = RESULTS / "bench_sampler_smoke.json"


def parse_sizes(text: str) -> list[int]:
    """``"64,512"`` -> ``[64, 512]``; each size is a number of views ``B = 2b`` (even, at least 4)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    bad = [b for b in sizes if b < 4 or b % 2]
    if not sizes or bad:
        raise ValueError(f"--sizes must be even batch sizes (2 views per image) >= 4, got {text!r}")
    return sizes


def unimodal_problem(B: int, d: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``B`` random unit features and the valid mask: view ``i``'s positive is ``i ^ 1``, and neither it
    nor the view itself is a candidate negative."""
    feats = F.normalize(torch.randn(B, d, device=device, generator=gen), dim=1)
    eye = torch.eye(B, dtype=torch.bool, device=device)
    valid = ~(eye | eye[torch.arange(B, device=device) ^ 1])
    return feats @ feats.t(), valid


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds: CUDA events around each call on GPU, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bit_identical(a: MHResult, b: MHResult) -> bool:
    """All five outputs equal bit for bit (floats compared as their bit patterns)."""
    def bits(x: torch.Tensor) -> torch.Tensor:
        return x.view(torch.int32) if x.is_floating_point() else x

    return all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def bench_size(B: int, *, repeats: int, warmup: int, device: torch.device, beta: float, d: int, seed: int) -> dict:
    """Time (i)-(iv) for one batch size; returns one JSON row."""
    R, P = B - 2, (B - 2) // 2
    gen = torch.Generator(device=device).manual_seed(seed)
    scores, valid = unimodal_problem(B, d, device, gen)
    coin = torch.rand(2, B, device=device, generator=gen) < 0.5  # half the chains resume from a stored state
    init_index = torch.where(coin[0], torch.randint(0, B, (B,), device=device, generator=gen), -1)
    init_score = torch.where(coin[1], torch.rand(B, device=device, generator=gen), float("-inf"))
    # what mh_visit_counts hands the chains: proposals drawn up front, in-batch init states re-scored
    prop = draw_mh_proposals(valid, R, generator=gen)
    prop_score = scores.gather(1, prop.index.t()).t().contiguous()
    stored = scores.gather(1, init_index.clamp(min=0)[:, None])[:, 0]
    chain_args = (prop.index, prop_score, prop.log_u, init_index, torch.where(init_index >= 0, stored, init_score),
                  beta, P, B)

    row: dict = {"B": B, "R": R, "P": P, "C": B}
    row["torch_ms"] = median_ms(lambda: mh_chains_torch(*chain_args), repeats, warmup, device)
    usable = mh_triton.is_usable(device)
    row["triton_ms"] = None
    row["triton_bit_exact"] = None
    if usable:
        row["triton_ms"] = median_ms(lambda: mh_triton.mh_chains_triton(*chain_args), repeats, warmup, device)
        row["triton_bit_exact"] = bit_identical(mh_chains_torch(*chain_args), mh_triton.mh_chains_triton(*chain_args))
    best = row["triton_ms"] if usable else row["torch_ms"]
    row["per_step_us"] = best * 1e3 / R

    feats = torch.randn(B, d, device=device, generator=gen, requires_grad=True)
    target = torch.arange(B, device=device) ^ 1
    self_mask = torch.eye(B, dtype=torch.bool, device=device)

    def infonce() -> None:
        z = F.normalize(feats, dim=1)
        logits = (beta * z @ z.t()).masked_fill(self_mask, float("-inf"))
        F.cross_entropy(logits, target).backward()
        feats.grad = None

    row["infonce_ms"] = median_ms(infonce, repeats, warmup, device)

    def full() -> MHResult:
        return mh_visit_counts(scores, beta=beta, steps=R, burn_in=P, valid=valid, init_index=init_index,
                               init_score=init_score, generator=gen)

    row["full_ms"] = median_ms(full, repeats, warmup, device)
    row["full_backend"] = "triton" if device.type == "cuda" and usable else "torch"
    row["ratio_sampler_over_infonce"] = row["full_ms"] / row["infonce_ms"]
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'B':>6} {'R':>6} {'torch ms':>10} {'triton ms':>10} {'us/step':>9} {'infonce ms':>11} {'full ms':>9}" \
           f" {'sampler/infonce':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tri = "n/a" if r["triton_ms"] is None else f"{r['triton_ms']:.4f}"
        lines.append(f"{r['B']:>6} {r['R']:>6} {r['torch_ms']:>10.3f} {tri:>10} {r['per_step_us']:>9.3f}"
                     f" {r['infonce_ms']:>11.3f} {r['full_ms']:>9.3f} {r['ratio_sampler_over_infonce']:>16.3f}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    triton_version = getattr(mh_triton.triton, "__version__", None)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    mode = None
    if mh_triton.is_usable(device):
        mode = "compiled" if device.type == "cuda" else "interpreter"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "triton_mode": mode, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="comma-separated B = 2b (default 64,256,512,2048,8192 on CUDA; 64,256,512 on CPU)")
    ap.add_argument("--repeats", type=int, help="timed repeats per measurement (default 20 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    ap.add_argument("--out", type=Path, help=f"JSON output (default {DEFAULT_OUT}; {SMOKE_OUT} with --smoke)")
    ap.add_argument("--device", help="cuda or cpu (default cuda when available)")
    ap.add_argument("--beta", type=float, default=5.0, help="inverse temperature (default 5)")
    ap.add_argument("--dim", type=int, default=128, help="feature dimension d (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="one tiny size, few repeats: checks the script runs")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    try:
        sizes = SMOKE_SIZES if args.smoke and not args.sizes else parse_sizes(args.sizes or ",".join(
            map(str, DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"])))
    except ValueError as e:
        ap.error(str(e))
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 20 if device.type == "cuda" else 5)
    warmup = 1 if args.smoke else args.warmup
    if repeats < 1 or warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)

    env = environment(device)
    print(f"device: {env['device']} ({device.type})  torch {env['torch']}  triton {env['triton']} "
          f"[{env['triton_mode'] or 'not usable'}]  beta={args.beta} d={args.dim} repeats={repeats} warmup={warmup}")
    rows = []
    for B in sizes:
        rows.append(bench_size(B, repeats=repeats, warmup=warmup, device=device, beta=args.beta, d=args.dim,
                               seed=args.seed))
        if rows[-1]["triton_bit_exact"] is False:
            print(f"WARNING: B={B}: Triton and torch chains differ", file=sys.stderr)
    print(format_table(rows))
    print("torch/triton ms: chains only (proposals pre-drawn); us/step: fastest chain path / R; full ms: "
          "mh_visit_counts (draws + chains); sampler/infonce = full ms / infonce fwd+bwd ms")

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {**env, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "timer": "cuda_events" if device.type == "cuda" else "perf_counter", "statistic": "median",
              "repeats": repeats, "warmup": warmup, "beta": args.beta, "dim": args.dim, "seed": args.seed,
              "smoke": args.smoke, "results": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
