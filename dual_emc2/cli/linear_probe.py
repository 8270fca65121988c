"""Linear probe and k-NN accuracy of a checkpoint's frozen backbone features (EMC² section 4 protocol).

    python eval/linear_probe.py --checkpoint runs/fmnist_emc2 [--data fashion_mnist] [--root DIR]
        [--max-train N] [--max-test N] [--probe-epochs 100] [--knn 1,20] [--out results.json]

(``dual-emc2-linear-probe ...`` is the same command as ``python eval/linear_probe.py ...``.)

The checkpoint may be a file, a run folder or its checkpoints/ folder (the newest intact checkpoint), or
``checkpoints/latest``.  Data, splits and image size default to the checkpoint's config.  Prints a table and writes
JSON next to the checkpoint (``ckpt-XXXXXXXX.probe.json``) unless ``--out`` says where.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dual_emc2.cli._io import USER_ERRORS, fail
from dual_emc2.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint file, run folder, checkpoints folder, or "
                                                        "checkpoints/latest")
    ap.add_argument("--data", default=None, help="dataset name (default: the checkpoint's data.name)")
    ap.add_argument("--root", default=None, help="data root (default: the checkpoint's data.root)")
    ap.add_argument("--train-split", default=None)
    ap.add_argument("--test-split", default=None)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--probe-epochs", type=int, default=100)
    ap.add_argument("--knn", default="1,20", help="comma-separated k values")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default: next to the checkpoint)")
    args = ap.parse_args(argv)

    from dual_emc2.train.checkpoint import load_checkpoint, resolve_checkpoint
    from dual_emc2.train.config import config_from_dict
    from dual_emc2.train.evaluate import eval_loaders, evaluate_features
    from dual_emc2.train.models import build_unimodal_model

    try:
        path = resolve_checkpoint(args.checkpoint)
        payload = load_checkpoint(path)
        mode = payload.get("config", {}).get("mode", "unimodal")
        if mode != "unimodal":
            raise UsageError(f"{path} is a two-tower (mode: {mode}) checkpoint; the linear probe evaluates one-tower "
                             f"image encoders. Evaluate it with: dual-emc2-retrieval --checkpoint {path}")
        cfg = config_from_dict(payload["config"], check_mode=False)
    except (*USER_ERRORS, RuntimeError) as e:
        return fail(e)
    model = build_unimodal_model(cfg)
    model.load_state_dict(payload["model"])
    model.to(args.device)
    d = cfg.data
    t0 = time.perf_counter()
    try:
        train_loader, test_loader = eval_loaders(
            args.data or d.name, args.root or d.root, args.train_split or d.eval_train_split,
            args.test_split or d.eval_test_split, d.image_size, batch_size=args.batch_size,
            max_train=args.max_train, max_test=args.max_test)
    except (*USER_ERRORS, ValueError) as e:
        return fail(e)
    ks = [int(k) for k in args.knn.split(",") if k]
    try:  # an unreadable image is a DataError naming the file
        metrics = evaluate_features(model.encoder.features, train_loader, test_loader, args.device,
                                    probe_epochs=args.probe_epochs, knn_k=ks, seed=cfg.seed)
    except USER_ERRORS as e:
        return fail(e)
    result = {"checkpoint": str(path), "step": payload["step"], "data": args.data or d.name,
              "n_train": len(train_loader.dataset), "n_test": len(test_loader.dataset),
              "seconds": round(time.perf_counter() - t0, 2), **metrics}
    out = Path(args.out) if args.out else path.with_suffix(".probe.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'metric':<26}{'value':>10}")
    for k, v in metrics.items():
        print(f"{k:<26}{v:>10.4f}")
    print(f"checkpoint step {payload['step']} ({cfg.loss.estimator}), {result['n_train']} train / "
          f"{result['n_test']} test images; JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
