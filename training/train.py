"""Fine-tune an ImageNet CNN to classify chest X-rays as NORMAL or PNEUMONIA.

    python -m training.train --data ../shared/data/kermany224 --arch efficientnet_lite0 \
        --out runs/lite0

Recipe: pretrained trunk, new dropout + linear head; progressive unfreezing (head first,
then deeper blocks, earlier blocks at lower learning rates); augmentation; class-weighted
loss with label smoothing; AdamW + warm-up + cosine schedule; early stopping on validation
AUC; the decision threshold chosen on the validation split. Runs on GPU (AMP,
channels_last) when there is one, on CPU otherwise, with the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from pneumoscan.evaluation.datasets import CLASS_NAMES, list_samples
from pneumoscan.evaluation.metrics import (
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
)
from pneumoscan.inference.preprocess import Preprocessing, normalise
from pneumoscan.modelling.architectures import (
    ARCHITECTURES,
    NORMALISATION,
    PneumoniaNet,
    build_network,
)

from .data import load_cached, split_by_patient


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "efficientnet_lite0"
    image_size: int = 224
    jpeg_quality: int | None = None  # see Preprocessing.jpeg_quality; 75 for Kermany 224 px
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.3
    label_smoothing: float = 0.1
    warmup_steps: int = 50
    # epoch (1-based) at which each further trunk stage is unfrozen, deepest first
    unfreeze_epochs: tuple[int, ...] = (2, 3, 4, 5)
    stage_lr_decay: float = 0.5  # each earlier stage trains at this fraction of the next
    patience: int = 4
    val_fraction: float = 0.15
    min_sensitivity: float = 0.95
    hflip: bool = False
    seed: int = 42
    workers: int | None = None  # DataLoader workers; default 4 on GPU, 0 (in-process) on CPU
    pretrained_weights: str | None = None
    download_weights: bool = False
    pretrained: bool = True
    max_steps_per_epoch: int | None = None  # for smoke tests
    limit_samples: int | None = None  # for smoke tests: first N of each class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_trainable(model: PneumoniaNet, open_stages: int) -> None:
    """The head always trains; of the trunk, only the `open_stages` deepest stages do.
    Frozen stages also keep their BatchNorm statistics (eval mode)."""
    for p in model.features.parameters():
        p.requires_grad_(False)
    model.features.eval()
    for stage in model.stages[:open_stages]:
        for p in stage.parameters():
            p.requires_grad_(True)
        stage.train(model.training)
    model.classifier.requires_grad_(True)
    model.dropout.train(model.training)


def open_stages_at(epoch: int, unfreeze_epochs: tuple[int, ...], n_stages: int) -> int:
    return min(sum(epoch >= e for e in unfreeze_epochs), n_stages)


def param_groups(model: PneumoniaNet, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """Head at `lr`, trunk stage i (0 = deepest) at lr * decay**(i+1). Parameters of the
    trunk outside any stage (none for the shipped architectures) go with the earliest."""
    groups = [{"params": list(model.classifier.parameters()), "lr": lr, "name": "head"}]
    seen = {id(p) for p in model.classifier.parameters()}
    for i, stage in enumerate(model.stages):
        params = [p for p in stage.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "lr": lr * decay ** (i + 1), "name": f"stage{i}"})
    rest = [p for p in model.features.parameters() if id(p) not in seen]
    groups[-1]["params"] += rest
    for g in groups:
        g["initial_lr"] = g["lr"]
        g["weight_decay"] = weight_decay
    return groups


def augmenter(size: int, hflip: bool) -> v2.Compose:
    steps = [v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.8, 1.25), antialias=True),
             v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
             v2.ColorJitter(brightness=0.3, contrast=0.3)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class AugmentedImages(torch.utils.data.Dataset):
    """Cached uint8 (N, H, W) images -> (augmented, normalised float (C, H, W), label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, aug: v2.Compose,
                 prep: Preprocessing):
        self.images, self.labels, self.aug, self.prep = images, labels, aug, prep

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.aug(torch.from_numpy(self.images[i])[None]).numpy()
        return torch.from_numpy(normalise(img, self.prep)[0]), int(self.labels[i])


def epoch_loader(dataset: AugmentedImages, cfg: TrainConfig, epoch: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Shuffled with a per-epoch seed, so a resumed run sees the same order."""
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                       generator=generator, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=False,
                                       persistent_workers=False)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, prep: Preprocessing, device: torch.device,
            batch_size: int, amp_dtype) -> np.ndarray:
    """Pneumonia probabilities for uint8 (N, H, W) images, without augmentation."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[i:i + batch_size], prep)).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    return np.concatenate(out)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def checkpoint_payload(model, optimizer, cfg, prep, epoch, step, history, best, threshold,
                       val_metrics) -> dict:
    return {
        "format": "pneumoscan-checkpoint-1",
        "arch": cfg.arch,
        "class_names": list(CLASS_NAMES),
        "preprocessing": asdict(prep),
        "dropout": cfg.dropout,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "threshold": threshold,
        "metrics": val_metrics,
        "config": asdict(cfg),
        "epoch": epoch,
        "step": step,
        "history": history,
        "best_auc": best,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
        "data_description": f"{cfg.data} ({cfg.val_fraction:.0%} of patients held out for "
                            f"validation, seed {cfg.seed})",
    }


def save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig, resume: Path | None = None, log=print) -> dict:
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if device.type == "cuda" else None
    mean, std = NORMALISATION[cfg.arch]
    prep = Preprocessing(cfg.image_size, cfg.image_size, 3, mean, std, "bilinear",
                         cfg.jpeg_quality)

    samples = list_samples(Path(cfg.data))
    if cfg.limit_samples:
        samples = [s for c in range(len(CLASS_NAMES))
                   for s in [x for x in samples if x.label == c][: cfg.limit_samples]]
    train_samples, val_samples = split_by_patient(samples, cfg.val_fraction, cfg.seed)
    (out / "split.json").write_text(json.dumps(
        {"train": [str(s.path) for s in train_samples],
         "val": [str(s.path) for s in val_samples]}, indent=0))
    t0 = time.time()
    train_x, train_y, problems = load_cached(train_samples, prep)
    val_x, val_y, val_problems = load_cached(val_samples, prep)
    for p in problems + val_problems:
        log(f"left out {p}")
    log(f"data: {len(train_y)} train ({np.bincount(train_y, minlength=2).tolist()}), "
        f"{len(val_y)} val ({np.bincount(val_y, minlength=2).tolist()}) images from "
        f"{len({s.patient for s in train_samples})} + {len({s.patient for s in val_samples})} "
        f"patients, decoded in {time.time() - t0:.0f}s; device {device}")

    model = build_network(cfg.arch, num_classes=len(CLASS_NAMES), dropout=cfg.dropout,
                          weights=cfg.pretrained_weights, download=cfg.download_weights,
                          pretrained=cfg.pretrained)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.stage_lr_decay,
                                               cfg.weight_decay))
    counts = np.bincount(train_y, minlength=2)
    class_weights = torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    dataset = AugmentedImages(train_x, train_y, augmenter(cfg.image_size, cfg.hflip), prep)

    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    history: list[dict] = []
    best_auc, best_epoch, start_epoch, step = -1.0, 0, 1, 0
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_auc, step = state["history"], state["best_auc"], state["step"]
        start_epoch = state["epoch"] + 1
        best_epoch = max((h["epoch"] for h in history if h["auc"] == best_auc), default=0)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log(f"resumed from {resume} after epoch {state['epoch']}")

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        n_open = open_stages_at(epoch, cfg.unfreeze_epochs, len(model.stages))
        set_trainable(model, n_open)
        t_epoch, losses, seen = time.time(), [], 0
        batches = epoch_loader(dataset, cfg, epoch, device)
        for _, (x, y) in zip(range(steps_per_epoch), batches):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            factor = lr_factor(step, total_steps, cfg.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            seen += len(y)
            step += 1
        train_seconds = time.time() - t_epoch
        val_prob = predict(model, val_x, prep, device, cfg.batch_size * 2, amp_dtype)
        val_loss = float(nn.functional.cross_entropy(
            torch.log(torch.from_numpy(np.stack([1 - val_prob, val_prob], 1)).clamp_min(1e-7)),
            torch.from_numpy(val_y)).item())
        m = binary_metrics(val_y, val_prob, 0.5)
        row = {"epoch": epoch, "open_stages": n_open, "train_loss": float(np.mean(losses)),
               "val_loss": val_loss, **{k: m[k] for k in ("accuracy", "sensitivity",
                                                           "specificity", "auc", "f1")},
               "lr": optimizer.param_groups[0]["lr"], "seconds": train_seconds,
               "images_per_s": seen / train_seconds}
        history.append(row)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        improved = m["auc"] > best_auc
        if improved:
            best_auc, best_epoch = m["auc"], epoch
        threshold = choose_threshold(val_y, val_prob, cfg.min_sensitivity)
        val_metrics = {"at_0.5": m, "at_threshold": binary_metrics(val_y, val_prob, threshold),
                       "n_val": int(len(val_y))}
        payload = checkpoint_payload(model, optimizer, cfg, prep, epoch, step, history,
                                     best_auc, threshold, val_metrics)
        save_atomic(payload, out / "last.pt")
        if improved:
            save_atomic(payload, out / "best.pt")
            np.savez(out / "val_predictions.npz", labels=val_y, probabilities=val_prob)
        write_history(history, out)
        if epoch - best_epoch >= cfg.patience:
            log(f"early stopping: no AUC gain for {cfg.patience} epochs (best epoch {best_epoch})")
            break

    summary = finalize(out, cfg)
    log(json.dumps(summary, indent=1))
    return summary


def write_history(history: list[dict], out: Path) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    keys = list(history[0])
    lines = [",".join(keys)] + [",".join(str(h[k]) for k in keys) for h in history]
    (out / "history.csv").write_text("\n".join(lines) + "\n")


def finalize(out: Path, cfg: TrainConfig) -> dict:
    """Metrics with bootstrap CIs and plots for the best checkpoint."""
    from pneumoscan.evaluation.plots import write_plots

    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    preds = np.load(out / "val_predictions.npz")
    labels, probs = preds["labels"], preds["probabilities"]
    threshold = best["threshold"]
    summary = {
        "arch": cfg.arch, "best_epoch": best["epoch"], "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= {cfg.min_sensitivity}",
        "validation": binary_metrics(labels, probs, threshold),
        "validation_ci95": bootstrap_intervals(labels, probs, threshold),
        "n_val": int(len(labels)),
    }
    best["metrics"]["ci95"] = summary["validation_ci95"]
    save_atomic(best, out / "best.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plots(best["history"], labels, probs, threshold, out)
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TrainConfig(data="", out="")
    p.add_argument("--data", required=True, help="Kermany root, labelled folder or CSV")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, plots)")
    p.add_argument("--arch", choices=ARCHITECTURES, default=d.arch)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality,
                   help="JPEG round trip after resizing, for data stored as JPEG at the "
                        "input size (the Kermany 224 px set: 75); training and inference "
                        "both apply it")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--unfreeze-epochs", default=",".join(map(str, d.unfreeze_epochs)),
                   help="epochs at which the next-deeper trunk stage opens, e.g. 2,3,4,5")
    p.add_argument("--stage-lr-decay", type=float, default=d.stage_lr_decay)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--min-sensitivity", type=float, default=d.min_sensitivity)
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    p.add_argument("--pretrained-weights", help="local ImageNet weights file for the backbone")
    p.add_argument("--download-weights", action="store_true",
                   help="download torchvision ImageNet weights (resnet50, densenet161)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--limit-samples", type=int)
    p.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    a["unfreeze_epochs"] = tuple(int(x) for x in a["unfreeze_epochs"].split(",") if x)
    return TrainConfig(**a), resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(cfg, resume, log=lambda msg: print(msg, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
