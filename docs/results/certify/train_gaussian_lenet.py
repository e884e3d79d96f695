"""Train the paper's MNIST LeNet with Gaussian noise training, briefly, into a run folder.

    python docs/results/certify/train_gaussian_lenet.py --out DIR [--sigma 0.25]
        [--epochs 1] [--max-minutes 8] [--lr 1e-3] [--batch-size 128] [--seed 0]
        [--data-root ROOT] [--threads 2]

Noise training as Cohen et al. (2019) train: every training image gets one fresh draw
of ``N(0, sigma^2 I)`` per epoch (:func:`experiments.augment.gaussian_noise_batches`),
Adam, plain cross-entropy, stopping after ``--epochs`` or ``--max-minutes``. The folder
gets a ``checkpoint.pt`` that ``python -m experiments certify --run DIR`` reads, and a
``training.json`` saying how it was trained. The checkpoint's configuration is the
``baseline`` LeNet one (the same architecture and test part; the run configuration has
no Gaussian noise method yet), so this folder is for certification only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.augment import gaussian_noise_batches
from experiments.checkpoints import CHECKPOINT_FORMAT
from experiments.config import RunConfig
from experiments.data import iterate_batches
from experiments.models import make_model
from experiments.rundata import prepare_data
from experiments.rundir import CHECKPOINT_FILE, package_version, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RunConfig(dataset="mnist", model="lenet", method="baseline", epochs=args.epochs,
                       seed=args.seed)
    data = prepare_data(config, args.data_root)
    model = make_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, steps, stopped, epoch = time.perf_counter(), 0, False, 0
    for epoch in range(1, args.epochs + 1):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        model.train()
        for x, y in gaussian_noise_batches(data.train, args.batch_size, args.sigma, args.seed,
                                           epoch, generator):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % 50 == 0:
                print(f"epoch {epoch} step {steps} loss {loss.item():.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
            if time.perf_counter() - start > 60 * args.max_minutes:
                stopped = True
                break
        if stopped:
            break
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in iterate_batches(data.val, 1000))
    val_accuracy = correct / len(data.val)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
             "training_key": "gaussian-noise-training", "epoch": epoch, "model": weights,
             "optimizer": optimizer.state_dict(), "scheduler": {},
             "early_stopping": {"best_epoch": epoch, "best_val_loss": float("nan"),
                                "bad_epochs": 0, "stopped": True},
             "history": [], "best_state": weights}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out / CHECKPOINT_FILE)
    info = {"method": "gaussian noise training", "sigma": args.sigma, "epochs": epoch,
            "gradient_steps": steps, "images_seen": steps * args.batch_size,
            "stopped_by_time_limit": stopped, "lr": args.lr, "batch_size": args.batch_size,
            "optimizer": "adam", "seed": args.seed, "clean_val_accuracy": val_accuracy,
            "train_seconds": time.perf_counter() - start, "threads": args.threads,
            "version": package_version()}
    write_json_atomic(args.out / "training.json", info)
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
