"""Worker for tests/test_sharded_state.py: W gloo processes read and write a sharded table with both exchange
protocols, with uneven per-process batches, and check every read and the assembled table against a replicated table
that each process updates with the whole global batch (bit for bit)."""
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from gather_exchange import GATHER  # noqa: E402

from dual_emc2.loss.state.exchange import ALL_TO_ALL  # noqa: E402
from dual_emc2.loss.state.keyed import ChainState, assemble_state_dict  # noqa: E402

N = 101


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.is_floating_point() else t


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for protocol, exchange in (("alltoall", ALL_TO_ALL), ("gather", GATHER)):
        sharded = ChainState(N, "sharded")
        sharded.exchange = exchange
        ref_key = torch.full((N,), -1, dtype=torch.int32)
        ref_score = torch.full((N,), float("-inf"))
        gen = torch.Generator().manual_seed(7)
        for step in range(12):
            sizes = torch.randint(0, 9, (world,), generator=gen).tolist()  # uneven, some processes empty
            glob = torch.randperm(N, generator=gen)[:sum(sizes)]
            lo = sum(sizes[:rank])
            keys = glob[lo:lo + sizes[rank]]
            cand, score, _ = sharded.read(keys)
            assert torch.equal(cand, ref_key[keys].long()), (protocol, step)
            assert torch.equal(_bits(score), _bits(ref_score[keys])), (protocol, step)
            new_key = torch.randint(-1, N, (glob.numel(),), generator=gen, dtype=torch.int32)
            new_score = torch.randn(glob.numel(), generator=gen)
            new_score[::5] = -0.0
            mine = slice(lo, lo + sizes[rank])
            if step % 3 == 2:  # a write whose keys are another tensor than the read's: its own key exchange
                keys = keys.clone()
            sharded.write(keys, new_key[mine], new_score[mine], torch.zeros_like(new_key[mine]))
            ref_key[glob], ref_score[glob] = new_key, new_score
        pieces = [None] * world
        dist.all_gather_object(pieces, {k: v.clone() for k, v in sharded.state_dict().items()})
        whole = assemble_state_dict({}, pieces)
        assert torch.equal(whole["candidate_key"], ref_key) and torch.equal(_bits(whole["score"]), _bits(ref_score))
    dist.destroy_process_group()


def main() -> None:
    world = int(sys.argv[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port), nprocs=world)
    print(f"exchange ok: {world} processes")


if __name__ == "__main__":
    main()
