"""Worker for tests/test_distributed.py: trains a few steps and dumps per-rank losses and final states."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dual_emc2.train.config import load_config  # noqa: E402
from dual_emc2.train.trainer import Trainer  # noqa: E402


class Recording(Trainer):
    losses: list

    def train_step(self, item):
        self.batches.append(item[0].tolist())
        out = super().train_step(item)
        self.losses.append(float(out[0]))
        return out


def main() -> None:
    out_dir, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fmnist_unimodal.yaml",
                      overrides + [f"output_dir={out_dir}"])
    t = Recording(cfg)
    t.losses, t.batches = [], []
    t.fit()
    rank = t.acc.process_index
    state = {k: v.cpu() for k, v in t.estimator.state_dict().items()}
    assignment = getattr(t.sampler, "assignment", None)
    torch.save({"losses": t.losses, "estimator": state, "model": t.core.state_dict(), "batches": t.batches,
                "assignment": assignment, "world": t.acc.num_processes}, Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"losses": t.losses}))


if __name__ == "__main__":
    main()
