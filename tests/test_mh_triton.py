"""The fused Triton M-H kernel gives bit-identical results to the torch reference loop.

Without a GPU the kernel runs under the Triton interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before
Triton is imported); the parent draws the inputs, runs :func:`mh_chains_torch` and compares all five outputs exactly.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dual_emc2.loss.estimators.emc2 import chain_triton as mh_triton
from dual_emc2.loss.estimators.emc2.chain import MHResult, draw_mh_proposals, mh_chains_torch, mh_visit_counts

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable (pip install triton)")

# (B chains, C candidates, R steps, P burn-in, beta): R below, at and off multiples of the kernel's TILE,
# B above the kernel's BLOCK, a single-candidate-per-row case and beta values not representable in float32.
CHAIN_CASES = [
    (5, 7, 37, 3, 2.3),
    (130, 12, 20, 0, 1 / 0.07),
    (3, 4, 5, 4, 1.0),
    (17, 30, 32, 10, 5.0),
    (9, 2, 41, 0, 0.5),
]
TIE_CASE = (6, 5, 35, 7, 1 / 0.07)
# end-to-end mh_visit_counts on a unimodal batch of b images x 2 views: (b, R, P, proposal)
VISIT_CASES = [(6, 10, 5, "batch"), (5, 23, 0, "permuted_scan"), (6, 17, 4, "pool"), (70, 33, 8, "pool")]

_RUNNER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from dual_emc2.loss.estimators.emc2 import chain_triton as mh_triton
    from dual_emc2.loss.estimators.emc2.chain import mh_visit_counts
    assert mh_triton.is_usable(torch.device("cpu")), "the Triton interpreter is not active"
    data = torch.load(sys.argv[1])
    out = {"chains": [tuple(mh_triton.mh_chains_triton(*args)) for args in data["chains"]], "visit": []}
    for kw in data["visit"]:
        gen = torch.Generator().manual_seed(kw.pop("seed"))
        out["visit"].append(tuple(mh_visit_counts(**kw, generator=gen, backend="triton")))
    torch.save(out, sys.argv[2])
    """
)


def _random_chain_args(B: int, C: int, R: int, P: int, beta: float, seed: int) -> tuple:
    """Pool proposals from a random mask with a different number of valid columns per row, mixed init states: rows
    whose out-of-batch state has a score propose it (column -1) along with their valid columns."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, C, generator=gen)
    density = torch.rand(B, 1, generator=gen) * 0.8 + 0.2
    valid = torch.rand(B, C, generator=gen) < density
    valid[torch.arange(B), torch.randint(0, C, (B,), generator=gen)] = True
    init_index = torch.where(torch.rand(B, generator=gen) < 0.5, torch.randint(0, C, (B,), generator=gen), -1)
    init_score = torch.where(torch.rand(B, generator=gen) < 0.5, torch.randn(B, generator=gen), float("-inf"))
    in_pool = (init_index < 0) & torch.isfinite(init_score)
    prop = draw_mh_proposals(valid, R, proposal="pool", generator=gen, state_in_pool=in_pool)
    idx = prop.index.t()
    prop_score = torch.where(idx < 0, init_score[:, None], scores.gather(1, idx.clamp(min=0))).t().contiguous()
    return (prop.index, prop_score, prop.log_u, init_index, init_score, beta, P, C)


def _tie_chain_args(B: int, C: int, R: int, P: int, beta: float, seed: int) -> tuple[tuple, int]:
    """Inputs where many acceptance tests are exact float32 ties ``log u == β (p − s)`` (which must reject), scores
    repeat (``p == s``) and some are ``-inf`` (``-inf − -inf`` is NaN: reject)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-8, 9, (B, C), generator=gen).float() / 8
    scores[torch.rand(B, C, generator=gen) < 0.1] = float("-inf")
    prop = draw_mh_proposals(torch.ones(B, C, dtype=torch.bool), R, generator=gen)
    prop_score = scores.gather(1, prop.index.t()).t().contiguous()
    init_index = torch.where(torch.arange(B) % 3 == 0, torch.arange(B) % C, -1)
    init_score = torch.where(torch.arange(B) % 2 == 0, torch.tensor(0.25), torch.tensor(float("-inf")))
    beta32 = torch.tensor(beta, dtype=torch.float32)
    log_u = prop.log_u.clone()
    make_tie = torch.rand(R, B, generator=gen) < 0.5
    cur, ties = init_score.clone(), 0
    for r in range(R):  # follow the chains to know s_cur, and put log u exactly on the threshold
        thr = beta32 * (prop_score[r] - cur)
        tie = make_tie[r] & torch.isfinite(thr)
        log_u[r] = torch.where(tie, thr, log_u[r])
        ties += int(tie.sum())
        cur = torch.where(log_u[r] < thr, prop_score[r], cur)
    return (prop.index, prop_score, log_u, init_index, init_score, beta, P, C), ties


def _unimodal_visit_kwargs(b: int, R: int, P: int, proposal: str, seed: int) -> dict:
    """2b views of b images; view i's positive is i ^ 1; candidates exclude self and positive."""
    gen = torch.Generator().manual_seed(seed)
    B = 2 * b
    feats = torch.nn.functional.normalize(torch.randn(B, 16, generator=gen), dim=1)
    eye = torch.eye(B, dtype=torch.bool)
    valid = ~(eye | eye[torch.arange(B) ^ 1])
    valid_col = torch.multinomial(valid.float(), 1, generator=gen)[:, 0]
    init_index = torch.where(torch.rand(B, generator=gen) < 0.5, valid_col, -1)
    init_score = torch.where(torch.rand(B, generator=gen) < 0.5, torch.rand(B, generator=gen), float("-inf"))
    return dict(scores=feats @ feats.t(), beta=3.0, steps=R, burn_in=P, valid=valid, init_index=init_index,
                init_score=init_score, proposal=proposal, seed=seed + 1)


def _assert_identical(ref: MHResult, got: tuple, what: str) -> None:
    """Bitwise equality of all five outputs (floats compared as bits: -0.0 != 0.0, equal NaNs match)."""
    assert len(got) == len(ref._fields)
    for name, a, b in zip(ref._fields, ref, got):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {b.dtype}{tuple(b.shape)} != {a.dtype}"
        if a.is_floating_point():
            a, b = a.view(torch.int32), b.view(torch.int32)
        assert torch.equal(a, b), f"{what}: {name} differs from the torch reference\nref={a}\ngot={b}"


def _subprocess_env() -> dict[str, str]:
    """Environment with the interpreter on (read when Triton is imported) and the repository importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every case through the kernel once, in one interpreter subprocess (the import costs more than a case)."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable (pip install triton)")
    tmp = tmp_path_factory.mktemp("mh_triton")
    chains = [_random_chain_args(*case, seed=i) for i, case in enumerate(CHAIN_CASES)]
    tie_args, ties = _tie_chain_args(*TIE_CASE, seed=99)
    chains.append(tie_args)
    visits = [_unimodal_visit_kwargs(*case, seed=10 + i) for i, case in enumerate(VISIT_CASES)]
    torch.save({"chains": chains, "visit": [dict(v) for v in visits]}, tmp / "in.pt")
    env = _subprocess_env()
    (tmp / "runner.py").write_text(_RUNNER)
    proc = subprocess.run([sys.executable, str(tmp / "runner.py"), str(tmp / "in.pt"), str(tmp / "out.pt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    out = torch.load(tmp / "out.pt")
    return {"chains": chains, "ties": ties, "visit": visits, "out": out}


@needs_triton
@pytest.mark.parametrize("case", range(len(CHAIN_CASES)), ids=[f"B{b}-C{c}-R{r}-P{p}" for b, c, r, p, _ in CHAIN_CASES])
@pytest.mark.determinism
def test_interpreted_kernel_matches_torch_reference(interpreted, case):
    args = interpreted["chains"][case]
    ref = mh_chains_torch(*args)
    _assert_identical(ref, interpreted["out"]["chains"][case], f"case {CHAIN_CASES[case]}")
    R, P = args[0].shape[0], args[6]
    assert torch.equal(ref.counts.sum(dim=1) + ref.stay, torch.full_like(ref.stay, R - P))


@needs_triton
@pytest.mark.determinism
def test_interpreted_kernel_rejects_exact_ties_like_the_reference(interpreted):
    args = interpreted["chains"][-1]
    assert interpreted["ties"] > 20, "the tie construction produced too few exact ties to test anything"
    ref = mh_chains_torch(*args)
    _assert_identical(ref, interpreted["out"]["chains"][-1], "exact-tie case")
    # the ties decide the outcome: a `<=` test (log u one ulp lower) would accept more
    le = mh_chains_torch(args[0], args[1], torch.nextafter(args[2], torch.tensor(float("-inf"))), *args[3:])
    assert le.accepted.sum() > ref.accepted.sum()


@needs_triton
def test_interpreted_cases_cover_stays_and_moves(interpreted):
    refs = [mh_chains_torch(*args) for args in interpreted["chains"]]
    assert any(bool((r.stay > 0).any()) for r in refs), "no chain ever sat on its out-of-batch init state"
    assert any(bool((r.index == -1).any()) for r in refs), "no chain ended on its out-of-batch init state"
    assert all(bool((r.accepted > 0).any()) for r in refs), "a case where no chain ever moved"
    assert any(bool((args[0] == -1).any()) for args in interpreted["chains"]), "no chain proposed its stored state"


@needs_triton
@pytest.mark.parametrize("case", range(len(VISIT_CASES)), ids=[f"b{c[0]}-R{c[1]}-{c[3]}" for c in VISIT_CASES])
@pytest.mark.determinism
def test_interpreted_visit_counts_match_torch_backend(interpreted, case):
    kw = dict(interpreted["visit"][case])
    gen = torch.Generator().manual_seed(kw.pop("seed"))
    ref = mh_visit_counts(**kw, generator=gen, backend="torch")
    _assert_identical(ref, interpreted["out"]["visit"][case], f"mh_visit_counts {VISIT_CASES[case]}")
    assert (ref.counts[~kw["valid"]] == 0).all(), "self or positive visited"


def test_import_and_probe_without_triton(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from dual_emc2.loss.estimators.emc2 import chain_triton as mh_triton
        assert not mh_triton.is_usable(torch.device("cpu"))
        assert not mh_triton.is_usable(torch.device("cuda"))
        z = torch.zeros(3, 2, dtype=torch.int64)
        try:
            mh_triton.mh_chains_triton(z, z.float(), z.float(), z[0], z[0].float(), 1.0, 0, 4)
        except RuntimeError as e:
            assert "Triton" in str(e), e
        else:
            raise AssertionError("no error without triton")
        """
    )
    env = _subprocess_env()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_probe_is_false_off_cuda_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert mh_triton.is_usable(torch.device("cpu")) is False
    assert mh_triton.is_usable(torch.device("meta")) is False
    assert mh_triton.is_usable(torch.device("cuda")) is (HAS_TRITON and torch.cuda.is_available())


def _valid_args(R: int = 4, B: int = 3, C: int = 5) -> list:
    return [torch.zeros(R, B, dtype=torch.int64), torch.zeros(R, B), torch.zeros(R, B),
            torch.full((B,), -1), torch.zeros(B), 1.0, 0, C]


@pytest.mark.parametrize(
    "pos,value,match",
    [
        (1, torch.zeros(4, 3, dtype=torch.float64), "prop_score"),
        (2, torch.zeros(3, 4), "log_u"),
        (0, torch.zeros(4, 3, dtype=torch.int32), "prop_index"),
        (3, torch.full((2,), -1), "init_index"),
        (4, torch.zeros(3, device="meta"), "init_score"),
        (6, -1, "burn_in"),
        (7, 0, "num_candidates"),
        (0, torch.tensor([[0, 1, 5]] * 4), "prop_index"),
        (3, torch.tensor([-2, 0, 1]), "init_index"),
    ],
)
def test_bad_input_raises_naming_the_field(pos, value, match):
    args = _valid_args()
    args[pos] = value
    with pytest.raises(ValueError, match=match):
        mh_triton.mh_chains_triton(*args)


def test_too_many_steps_for_exact_float32_counts_raises():
    args = _valid_args(R=2**24, B=0)
    args[3], args[4] = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        mh_triton.mh_chains_triton(*args)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_sampler", ROOT / "experiments" / "bench_sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_problem_excludes_self_and_positive_and_sizes_are_checked():
    bench = _load_bench()
    scores, valid = bench.unimodal_problem(8, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert scores.shape == (8, 8) and torch.allclose(scores.diagonal(), torch.ones(8))
    assert valid.sum(dim=1).tolist() == [6] * 8
    assert not valid.diagonal().any() and not valid[torch.arange(8), torch.arange(8) ^ 1].any()
    assert bench.parse_sizes("64, 512") == [64, 512]
    for bad in ("64,7", "2", "x"):
        with pytest.raises(ValueError, match="--sizes"):
            bench.parse_sizes(bad)


def test_bench_smoke_run_writes_its_json(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "results" / "bench.json"
    assert _load_bench().main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["torch"] == torch.__version__ and record["device_type"] == "cpu" and record["smoke"] is True
    (row,) = record["results"]
    assert (row["B"], row["R"], row["P"]) == (16, 14, 7)
    assert all(row[k] > 0 for k in ("torch_ms", "per_step_us", "infonce_ms", "full_ms"))
    assert row["ratio_sampler_over_infonce"] == pytest.approx(row["full_ms"] / row["infonce_ms"])


# ---------------------------------------------------------------------------------------------------------- CUDA


def _cuda_ready() -> None:
    if not mh_triton.is_usable(torch.device("cuda")):
        pytest.skip("Triton is not importable on this CUDA machine")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("B,R,proposal", [(512, 510, "batch"), (512, 510, "permuted_scan"), (512, 510, "pool"),
                                          (2000, 77, "pool")])
@pytest.mark.determinism
def test_cuda_triton_backend_matches_torch_backend(B, R, proposal):
    _cuda_ready()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(B, 128, device=dev, generator=g), dim=1)
    eye = torch.eye(B, dtype=torch.bool, device=dev)
    valid = ~(eye | eye[torch.arange(B, device=dev) ^ 1])
    coin = torch.rand(2, B, device=dev, generator=g) < 0.5
    init_index = torch.where(coin[0], torch.randint(0, B, (B,), device=dev, generator=g), -1)
    init_score = torch.where(coin[1], torch.rand(B, device=dev, generator=g), float("-inf"))
    common = dict(beta=14.285714285714286, steps=R, burn_in=R // 2, valid=valid, init_index=init_index,
                  init_score=init_score, proposal=proposal)
    scores = feats @ feats.t()
    ref = mh_visit_counts(scores, **common, generator=torch.Generator(device=dev).manual_seed(11), backend="torch")
    got = mh_visit_counts(scores, **common, generator=torch.Generator(device=dev).manual_seed(11), backend="triton")
    _assert_identical(ref, tuple(got), f"CUDA B={B} R={R} {proposal}")
    assert torch.equal(ref.counts.sum(dim=1) + ref.stay, torch.full_like(ref.stay, R - R // 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.determinism
def test_cuda_kernel_rejects_exact_ties_like_the_reference():
    _cuda_ready()
    args, ties = _tie_chain_args(300, 40, 200, 20, 1 / 0.07, seed=5)
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    assert ties > 1000
    _assert_identical(mh_chains_torch(*args), tuple(mh_triton.mh_chains_triton(*args)), "CUDA exact-tie case")
