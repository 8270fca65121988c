#!/usr/bin/env python
"""Time per training step of each estimator against SimCLR (InfoNCE) in one run, the estimators' state memory, and
the trainer's own overhead.

Table 1 (estimators). One model, one optimiser (Adam) and one synthetic batch of 2b views already on the device; each
step is forward → ContrastiveBatch (:func:`dual_emc2.loss.batches.unimodal_contrastive_batch`) → estimator →
backward → optimiser step, with fresh global ids every step (so chain states and caches are read and written as in
training). Every EMC² chain starts with a state (:func:`fill_chains`), as from the second epoch of training on, so
nearly every anchor's state lies outside the batch and is encoded (at q = 1: 2b state rows beside the 2b views).
EMC² (``emc2``, ``emc2_q025``) plans its states before the forward and encodes them in the batch's own forward pass,
as the trainer does (stand-in images already on the device, as the loader's workers deliver them);
``emc2_unaugmented`` is the earlier path, a second forward of the states' un-augmented images by id with norm layers
in eval mode. Estimators are timed round-robin, one step each per round, so
load drift hits all of them alike; the median over rounds after warm-up is reported with its ratio to SimCLR. On CUDA:
CUDA events, channels_last, peak ``torch.cuda.max_memory_allocated`` of one step, and the number of host–device
synchronisations of one step (``torch.cuda.set_sync_debug_mode``). Estimator options follow Table 3 of the paper (EMC² P
= b − 1, negative-cache refresh ρ = 0.01024 at b = 32 and 0.1 at b = 256) unless overridden.

State memory: bytes of each estimator's buffers over the m-sample dataset (2 views, so 2m anchor keys): the EMC² chain
state per anchor key (candidate key, score, view epoch), SogCLR's u, the negative cache's m_neg × d float features (plus
its per-entry refresh step).

Table 2 (trainer overhead).  ``Trainer.train_step`` on a synthetic on-device batch against a bare torch loop doing the
same forward / estimator / backward / optimiser step on the same model, optimiser and estimator objects, interleaved;
the overhead is the median of the paired ratios.

    python experiments/bench_step.py                        # CPU: ResNet-18, 28 px, b = 32 (minutes on 2 cores)
    python experiments/bench_step.py --preset gpu    # ResNet-18 96 px b = 32 and 256, ResNet-50 224 px b = 256 bf16
    python experiments/bench_step.py --arch resnet18 --size 96 --batch 256 --amp bf16 --device cuda
    python experiments/bench_step.py --smoke                # seconds (CI)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    ROOT,
    StepTimer,
    default_out,
    describe_machine,
    format_table,
    machine_info,
    median,
    resolve_device,
    write_json,
)
from torch import Tensor, nn

from dual_emc2.loss.batches import unimodal_contrastive_batch, unimodal_layout
from dual_emc2.loss.registry import build_estimator
from dual_emc2.towers.heads import build_image_encoder

ESTIMATORS = ("simclr", "emc2", "emc2_q025", "emc2_unaugmented", "emc2_stale_drop", "sogclr", "hcl",
              "negative_cache")
VIEWS = 2


@dataclass(frozen=True)
class Case:
    """One benchmark setting: backbone, image size, batch b (images; 2b views), precision, projection dim d,
    dataset size m (state and cache sizes), β, and the Table-3 estimator options that depend on b."""

    arch: str
    size: int
    batch: int
    amp: str = "no"
    dim: int = 128
    dataset: int = 100_000
    beta: float = 5.0
    cache_refresh: float = 0.1
    cifar_stem: bool = False

    @property
    def label(self) -> str:
        return f"{self.arch} {self.size}px b={self.batch} {'bf16' if self.amp == 'bf16' else 'fp32'}"


PRESETS: dict[str, list[Case]] = {
    # 2-core CPU: the embedded default's network and batch (configs/fmnist_unimodal.yaml: ResNet-18, standard stem,
    # 28 px, b = 32, d = 128, 4,000 images)
    "cpu": [Case("resnet18", 28, 32, dim=128, dataset=4_000, cache_refresh=0.01024)],
    # the paper's settings (Table 3): STL-10 ResNet-18 at b = 32 and 256, ImageNet-100 ResNet-50 at b = 256
    "gpu": [Case("resnet18", 96, 32, dim=512, dataset=100_000, beta=14.28, cache_refresh=0.01024),
            Case("resnet18", 96, 256, dim=512, dataset=100_000, beta=5.0, cache_refresh=0.1),
            Case("resnet50", 224, 256, amp="bf16", dim=128, dataset=124_689, beta=14.28, cache_refresh=0.01)],
    "smoke": [Case("resnet18", 8, 4, dim=32, dataset=64, cifar_stem=True, cache_refresh=0.1)],
}


def estimator_options(name: str, case: Case) -> tuple[str, dict[str, Any]]:
    """Registry name and options of a table row: ``emc2`` is the default (Rao–Blackwell weights over the thinned batch
    ∪ state, every out-of-batch state encoded with the batch), ``emc2_q025`` encodes a random quarter of them
    (weighted 4×), ``emc2_unaugmented`` the default estimator fed the earlier way (a second forward by id, eval
    mode), and ``emc2_stale_drop`` the paper's Algorithm 1 with stale scores and no state features (P = b − 1,
    Table 3)."""
    return {
        "simclr": ("infonce", {}),
        "emc2": ("emc2", {}),
        "emc2_q025": ("emc2", {"reencode_fraction": 0.25}),
        "emc2_unaugmented": ("emc2", {}),
        "emc2_stale_drop": ("emc2", {"weights": "visits", "proposal": "batch", "burn_in": case.batch - 1,
                                     "state_score": "stale", "out_of_batch": "drop"}),
        "sogclr": ("sogclr", {"gamma": 0.9}),
        "hcl": ("hcl", {}),
        "negative_cache": ("negative_cache", {"dim": case.dim, "refresh": case.cache_refresh, "init_full": False}),
    }[name]


def state_memory(objective: nn.Module, num_keys: int) -> dict[str, float]:
    """Bytes held in the estimator's buffers (its whole state), in total and per anchor key."""
    total = sum(b.numel() * b.element_size() for b in objective.buffers())
    out: dict[str, float] = {"state_bytes": total, "state_bytes_per_anchor": total / num_keys}
    chains = getattr(objective, "chains", None)
    if chains is not None:
        chain = sum(b.numel() * b.element_size() for b in chains.buffers())
        out["chain_bytes_per_anchor"] = chain / chains.num_keys
    feats = getattr(objective, "features", None)
    if isinstance(feats, Tensor):
        out["cache_floats"] = feats.numel()  # m_neg × d
        out["cache_bytes"] = feats.numel() * feats.element_size()
    return out


def fill_chains(objective: nn.Module, num_candidate_keys: int, generator: torch.Generator) -> int:
    """Give every anchor key of an EMC² estimator a chain state (a random candidate view of epoch 0, score 0), as after
    the first epoch of training, where every anchor has one; returns the number of chains filled (0 for estimators
    without chains).  Without it a benchmark of a few dozen steps over fresh ids would time mostly empty chains, which
    need no state features at all."""
    chains = getattr(objective, "chains", None)
    if chains is None:
        return 0
    keys = torch.arange(chains.num_keys)
    device = chains.columns()[0].device
    candidate = torch.randint(num_candidate_keys, (keys.numel(),), generator=generator)
    chains.write(keys.to(device), candidate.to(device), torch.zeros(keys.numel(), device=device),
                 torch.zeros(keys.numel(), dtype=torch.long, device=device))
    return keys.numel()


def count_syncs(fn: Callable[[], Any]) -> int | None:
    """Host–device synchronisations during ``fn()`` (CUDA only; None on CPU), from torch's sync debug mode."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


class Bench:
    """Model, optimiser, batch and estimators of one :class:`Case` on one device."""

    def __init__(self, case: Case, device: torch.device, names: list[str], steps: int, seed: int = 0) -> None:
        self.case, self.device = case, device
        cuda = device.type == "cuda"
        torch.manual_seed(seed)
        self.model = build_image_encoder(case.arch, case.cifar_stem, 2048 if case.arch == "resnet50" else 512,
                                         case.dim, channels_last=cuda).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(case.batch * VIEWS, 3, case.size, case.size, device=device)
        if cuda:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        # stand-in un-augmented images for the estimators' out-of-batch encodes (EMC² re-encode, negative cache)
        self.pool = torch.randn(min(case.dataset, 512), 3, case.size, case.size, device=device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.amp == "bf16")
        g = torch.Generator().manual_seed(seed)
        # distinct ids within a step, fresh every step, made up front so no host work is timed
        self.ids = torch.stack([torch.randperm(case.dataset, generator=g)[:case.batch]
                                for _ in range(steps)]).to(device)
        self.objectives = {}
        for n in names:
            reg, opts = estimator_options(n, case)
            self.objectives[n] = build_estimator(reg, num_keys=case.dataset * VIEWS, num_candidates=case.dataset,
                                                 options=opts, defaults={"seed": seed}).to(device)
            self.objectives[n].check_batch_shape((case.batch - 1) * VIEWS)
            fill_chains(self.objectives[n], case.dataset * VIEWS, g)
        self.counter = 0

    def encode(self, ids: Tensor) -> Tensor:
        """ψ of stand-in images for global ids, batch norm in eval mode: the negative cache's encoder, and EMC²'s states
        fed the earlier way (``emc2_unaugmented``)."""
        was = self.model.training
        self.model.eval()
        try:
            with self.amp:
                return self.model(self.pool[ids.to(self.device) % self.pool.shape[0]]).float()
        finally:
            self.model.train(was)

    def step(self, name: str) -> None:
        obj = self.objectives[name]
        ids = self.ids[self.counter % self.ids.shape[0]]
        self.counter += 1
        x, plan = self.x, None
        by_id = obj.needs_candidate_encoder or name == "emc2_unaugmented"
        if obj.needs_state_features and not by_id:  # the states this step needs, in the batch's forward
            anchor_keys, _, candidate_keys, offset, total = unimodal_layout(ids, VIEWS)
            plan = obj.plan(anchor_keys, candidate_keys, views_per_id=VIEWS, row_offset=offset, total_rows=total)
            x = torch.cat([x, self.pool[plan.views.ids.to(self.device) % self.pool.shape[0]]])
        with self.amp:
            z = self.model(x).float()
        rows = self.x.shape[0]
        batch = unimodal_contrastive_batch(z[:rows], ids, VIEWS, encode_candidates=self.encode if by_id else None,
                                           state_plan=plan, state_features=z[rows:] if plan is not None else None)
        out = obj(batch, self.case.beta)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def bench_case(case: Case, device: torch.device, names: list[str], repeats: int, warmup: int) -> list[dict]:
    """Table-1 rows of one case: median ms per step, ratio to SimCLR, peak memory, syncs, state memory."""
    bench = Bench(case, device, names, steps=(warmup + repeats + 2) * len(names))
    timer = StepTimer(device)
    cuda = device.type == "cuda"
    for n in names:
        for _ in range(warmup):
            bench.step(n)
    peak, syncs = {}, {}
    for n in names:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        bench.step(n)
        peak[n] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        syncs[n] = count_syncs(lambda n=n: bench.step(n))
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            times[n].append(timer(lambda n=n: bench.step(n)))
    base = median(times["simclr"]) if "simclr" in times else float("nan")
    rows = []
    for n in names:
        med = median(times[n])
        rows.append({"case": case.label, "estimator": n, "options": estimator_options(n, case)[1],
                     "batch": case.batch, "views": case.batch * VIEWS, "median_ms": med,
                     "min_ms": min(times[n]), "ratio_vs_simclr": med / base,
                     "views_per_s": case.batch * VIEWS / med * 1e3, "peak_mem_mib": peak[n],
                     "peak_mem_vs_simclr_mib": (peak[n] - peak["simclr"]) if cuda and "simclr" in peak else None,
                     "host_syncs_per_step": syncs[n], "times_ms": times[n],
                     **state_memory(bench.objectives[n], case.dataset * VIEWS)})
    return rows


def trainer_overhead(case: Case, device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """``Trainer.train_step`` vs a bare torch loop on the same objects and the same on-device batch (EMC² default)."""
    from dual_emc2.train.config import load_config
    from dual_emc2.train.trainer import Trainer

    b = case.batch
    out_dir = Path(tempfile.mkdtemp(prefix="bench_step_trainer_"))
    cfg = load_config(ROOT / "configs/fmnist_unimodal.yaml", [
        "data.name=digits", "data.num_workers=0", f"data.image_size={case.size}", f"train.batch_size={b}",
        f"model.arch={case.arch}", f"model.cifar_stem={str(case.cifar_stem).lower()}",
        f"model.proj_hidden={2048 if case.arch == 'resnet50' else 512}", f"model.proj_dim={case.dim}",
        f"model.channels_last={str(device.type == 'cuda').lower()}", f"loss.beta={case.beta}",
        "loss.estimator=emc2", "eval.enabled=false",
        f"train.mixed_precision={'bf16' if case.amp == 'bf16' else 'no'}", f"output_dir={out_dir}"])
    trainer = Trainer(cfg)
    if trainer.device.type != device.type:
        raise SystemExit(f"the trainer picked {trainer.device}, the benchmark runs on {device}")
    core, raw_opt, task = trainer.core, trainer.optimizer.optimizer, trainer.task
    dataset = task.train_set
    n_ids = len(dataset)
    g = torch.Generator().manual_seed(0)
    fill_chains(task.estimator, n_ids * VIEWS, g)  # every anchor has a state, as from the second epoch on
    id_list = [torch.randperm(n_ids, generator=g)[:b] for _ in range(2 * (warmup + repeats) + 4)]
    it = iter(id_list * 2)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.amp == "bf16")
    views = torch.randn(b, VIEWS, 3, case.size, case.size)

    def item() -> tuple:
        """What the loader's workers deliver (not timed): ids, views, labels and the anchors' state views, read from
        the chains as they stand now."""
        ids = next(it)
        dataset.set_states(*task.estimator.state_views())
        slots = [dataset[int(i)][3] for i in ids]
        return ids, views, None, tuple(torch.stack([s[k] for s in slots]) for k in range(3))

    def bare(batch: tuple) -> None:
        ids, v, _, slots = batch
        need = task.loss_fn.state_request(ids, epoch=0).y
        x = torch.cat([v.flatten(0, 1), task._state_images(need, slots)]).to(device)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            z = core(x).float()
        loss = task.loss_fn.forward_views(z[:b * VIEWS].view(b, VIEWS, -1), ids.to(device), core.temperature(),
                                          epoch=0, state_features=z[b * VIEWS:])
        loss.backward()
        raw_opt.step()
        raw_opt.zero_grad(set_to_none=True)

    def wrapped(batch: tuple) -> None:
        trainer.train_step(batch)

    core.train()
    for _ in range(warmup):
        bare(item())
        wrapped(item())
    syncs = {"bare": count_syncs(lambda: bare(item())), "trainer": count_syncs(lambda: wrapped(item()))}
    timer = StepTimer(device)
    t_bare, t_trainer = [], []
    for i in range(repeats):  # alternate which goes first, so neither always follows the other
        first, second = item(), item()
        if i % 2:
            t_trainer.append(timer(lambda batch=first: wrapped(batch)))
            t_bare.append(timer(lambda batch=second: bare(batch)))
        else:
            t_bare.append(timer(lambda batch=first: bare(batch)))
            t_trainer.append(timer(lambda batch=second: wrapped(batch)))
    ratios = [t / b_ for t, b_ in zip(t_trainer, t_bare)]
    return {"case": case.label, "estimator": "emc2 (trainer default)", "bare_ms": median(t_bare),
            "trainer_ms": median(t_trainer), "overhead": median(ratios) - 1.0,
            "overhead_of_medians": median(t_trainer) / median(t_bare) - 1.0, "host_syncs_per_step": syncs,
            "bare_times_ms": t_bare, "trainer_times_ms": t_trainer}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="cases to run (default: gpu on CUDA, cpu otherwise); --arch/--size/--batch make one case")
    ap.add_argument("--arch", default=None, help="resnet18, resnet50, ... (custom case)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (custom case)")
    ap.add_argument("--batch", default=None, help="comma-separated b (images per step; 2b views)")
    ap.add_argument("--amp", choices=("no", "bf16"), default=None)
    ap.add_argument("--dim", type=int, default=None, help="projection dimension d")
    ap.add_argument("--dataset", type=int, default=None, help="m: dataset size (state and cache sizes)")
    ap.add_argument("--cache-refresh", type=float, default=None, help="negative cache ρ")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help=f"from {','.join(ESTIMATORS)}")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-trainer", action="store_true", help="skip the trainer-overhead table")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default experiments/results/bench_step_<device>[_smoke].json)")
    args = ap.parse_args(argv)
    names = [n for n in args.estimators.split(",") if n]
    if not names or any(n not in ESTIMATORS for n in names):
        ap.error(f"--estimators: choose from {', '.join(ESTIMATORS)}, got {args.estimators!r}")
    if "simclr" not in names:
        names.insert(0, "simclr")  # the reference of every ratio
    args.names = names
    if args.smoke:
        args.preset, args.repeats, args.warmup = "smoke", 3, 1
    return args


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cases = PRESETS[preset]
    if args.arch or args.size or args.batch:
        base = cases[0]
        batches = [int(b) for b in args.batch.split(",")] if args.batch else [base.batch]
        cases = [replace(base, arch=args.arch or base.arch, size=args.size or base.size, batch=b,
                         cifar_stem=(args.size or base.size) <= 32) for b in batches]
    overrides = {k: v for k, v in (("amp", args.amp), ("dim", args.dim), ("dataset", args.dataset),
                                   ("cache_refresh", args.cache_refresh)) if v is not None}
    cases = [replace(c, **overrides) for c in cases]
    for c in cases:
        if c.batch < 2 or c.dataset < c.batch:
            raise SystemExit(f"case {c.label}: need b >= 2 and dataset m >= b, got b={c.batch}, m={c.dataset}")
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = build_cases(args, device)
    out = Path(args.out) if args.out else default_out(f"bench_step_{device.type}", args.smoke)
    info = machine_info(device)
    print(f"machine: {describe_machine(info)}; median of {args.repeats} steps after {args.warmup} warm-up", flush=True)
    rows: list[dict] = []
    for case in cases:
        rows += bench_case(case, device, args.names, args.repeats, args.warmup)
        print(f"  {case.label}: done", flush=True)
    overhead = None if args.no_trainer else [trainer_overhead(c, device, args.repeats, args.warmup) for c in cases]
    result = {"protocol": "per-step time of each estimator vs SimCLR; state memory; trainer overhead",
              "command": " ".join(["python", "experiments/bench_step.py", *(sys.argv[1:] if argv is None else argv)]),
              "machine": info, "repeats": args.repeats, "warmup": args.warmup,
              "cases": [asdict(c) for c in cases], "rows": rows, "trainer_overhead": overhead}
    write_json(out, result)

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print(f"\nStep time, {describe_machine(info)}")
    print(format_table(
        ["case", "estimator", "ms/step", "× SimCLR", "views/s", "peak MiB", "Δ peak MiB", "syncs/step",
         "state B/anchor", "state MiB"],
        [[r["case"], r["estimator"], f"{r['median_ms']:.2f}", f"{r['ratio_vs_simclr']:.3f}",
          f"{r['views_per_s']:.0f}", fmt(r["peak_mem_mib"], ".0f"), fmt(r["peak_mem_vs_simclr_mib"], "+.0f"),
          fmt(r["host_syncs_per_step"], "d"), f"{r['state_bytes_per_anchor']:.2f}",
          f"{r['state_bytes'] / 2**20:.2f}"] for r in rows]))
    mems = [r for r in rows if "chain_bytes_per_anchor" in r or "cache_floats" in r]
    if mems:
        print("\nEstimator state (m = dataset size, 2 views per sample → 2m anchor keys)")
        print(format_table(["case", "estimator", "EMC² chain B/anchor", "cache m_neg × d floats", "cache MiB"],
                           [[r["case"], r["estimator"], fmt(r.get("chain_bytes_per_anchor"), ".1f"),
                             fmt(r.get("cache_floats"), ",d"), fmt(r.get("cache_bytes", 0) / 2**20, ".1f")]
                            for r in mems]))
    if overhead:
        print("\nTrainer overhead: Trainer.train_step vs a bare loop (same model, optimiser, estimator, batch)")
        print(format_table(["case", "bare ms", "trainer ms", "overhead", "syncs bare", "syncs trainer"],
                           [[o["case"], f"{o['bare_ms']:.2f}", f"{o['trainer_ms']:.2f}", f"{100 * o['overhead']:+.1f}%",
                             fmt(o["host_syncs_per_step"]["bare"], "d"), fmt(o["host_syncs_per_step"]["trainer"], "d")]
                            for o in overhead]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
