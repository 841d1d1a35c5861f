"""Fine-tune an ImageNet CNN to classify chest X-rays as NORMAL or PNEUMONIA.

    python -m training.train --data ../shared/data/kermany224 --arch efficientnet_lite0 \
        --out runs/lite0

Recipe: pretrained trunk, new dropout + linear head; progressive unfreezing (head first,
then deeper blocks, earlier blocks at lower learning rates); storage augmentation
(training/augment.py: how else the image could have been resized, compressed and stored);
class-weighted loss with label smoothing; AdamW + warm-up + cosine schedule; an exponential
moving average of the weights validated beside them; early stopping on validation AUC;
probability calibration and the decision threshold fitted on the validation split. Structured
as torchvision's references/classification: `train_one_epoch`, `evaluate`, `train`. Runs on
GPU (AMP, channels_last) when there is one, on CPU otherwise, with the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pneumoscan.evaluation.datasets import (
    CLASS_NAMES,
    list_samples,
    patient_id,
    split_by_patient,
)
from pneumoscan.evaluation.metrics import (
    binary_metrics,
    bootstrap_intervals,
    calibration_intervals,
    calibration_metrics,
    choose_threshold,
    cross_fitted_operating_point,
    expected_calibration_error,
)
from pneumoscan.inference.model import ModelError
from pneumoscan.inference.preprocess import Preprocessing, normalise
from pneumoscan.modelling.checkpoint import read_checkpoint
from pneumoscan.modelling.architectures import (
    ARCHITECTURES,
    NORMALISATION,
    PneumoniaNet,
    build_network,
)
from pneumoscan.text import format_duration

from . import augment
from .data import load_cached

# The state-dict key of the network's input low-pass (architectures.GaussianLowPass).
LOW_PASS_KERNEL = "features.low_pass.kernel"


def option(default=MISSING, help: str = ""):
    """A TrainConfig field: its default and the help text of its command-line option."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run; `parse_args` makes one command-line option of each field."""
    data: str = option(help="Kermany root, labelled folder or CSV")
    out: str = option(help="output folder (checkpoints, metrics, plots)")
    arch: str = option("efficientnet_lite0", f"network: {', '.join(ARCHITECTURES)}")
    image_size: int = option(224, "input height and width")
    jpeg_quality: int | None = option(
        None, "JPEG round trip after resizing, applied in training and stored for inference "
              "(see Preprocessing.jpeg_quality); off by default: the storage augmentation "
              "teaches the network to ignore compression instead")
    storage_augment: bool = option(True, "draw how each training image was stored "
                                         "(training/augment.py)")
    epochs: int = option(10, "most epochs (early stopping may end sooner)")
    batch_size: int = option(32, "images per training step")
    lr: float = option(1e-3, "head learning rate; trunk stages get less (--stage-lr-decay)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    dropout: float = option(0.3, "dropout before the linear head")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    warmup_steps: int = option(50, "linear warm-up before the cosine decay")
    unfreeze_epochs: tuple[int, ...] = option(
        (2, 3, 4, 5), "epochs (1-based) at which the next-deeper trunk stage opens, "
                      "comma-separated")
    stage_lr_decay: float = option(0.5, "each earlier stage trains at this fraction of the "
                                         "learning rate of the next")
    ema_decay: float | None = option(
        0.998, "per-step decay of an exponential moving average of the weights, validated "
               "beside the weights themselves (the better one is kept); none to disable")
    patience: int = option(4, "early stopping: epochs without a validation AUC gain")
    val_fraction: float = option(0.15, "fraction of patients held out for validation")
    val_split: str = option(
        "random", "which patients are held out: random (a seeded draw in each class) or "
                  "latest (the highest-numbered patients of each class and series: Kermany's "
                  "VAL split continues TRAIN's numbering)")
    val_fold: int = option(0, "with --val-split random, which cut of the shuffled patients is "
                              "held out: folds 0 to 1/val-fraction - 1 make a patient-level "
                              "cross-validation")
    min_sensitivity: float = option(0.95, "threshold rule: the highest threshold with at "
                                          "least this validation sensitivity")
    hflip: bool = option(False, "random horizontal flips")
    seed: int = option(42, "seed of the split, the initialisation and the augmentation")
    workers: int | None = option(None, "DataLoader workers (default: 4 on GPU, 0 on CPU)")
    pretrained_weights: str | None = option(None, "local ImageNet weights file for the "
                                                  "backbone")
    download_weights: bool = option(False, "download torchvision ImageNet weights "
                                           "(resnet50, densenet161)")
    pretrained: bool = option(True, "start from ImageNet weights")
    init_from: str | None = option(None, "start from this training checkpoint's weights "
                                         "(fine-tuning; its calibration is refitted)")
    consistency: float = option(
        0.0, "weight of a consistency loss: each image is drawn stored two ways that differ "
             "only in storage noise (augment.draw_pair) and the squared difference of their "
             "logit margins is added to the loss (each batch holds --batch-size such pairs); "
             "0 to disable")
    low_pass_sigma: float = option(
        0.0, "sigma in pixels of a fixed Gaussian low-pass at the network's input "
             "(architectures.GaussianLowPass; exported with the network); 0 for none")
    max_steps_per_epoch: int | None = option(None, "for smoke tests")
    limit_samples: int | None = option(None, "for smoke tests: first N of each class")
    progress_seconds: float = option(30.0, "seconds between progress lines")


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


class AugmentedImages(torch.utils.data.Dataset):
    """Cached uint8 (N, H, W) images -> (augmented, normalised float (C, H, W), label).
    Each item's storage draw is seeded from torch's generator, which DataLoader seeds per
    worker and a resumed run restores."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, prep: Preprocessing,
                 cfg: TrainConfig):
        self.images, self.labels, self.prep, self.cfg = images, labels, prep, cfg

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        """(C, H, W), or (2, C, H, W) with `consistency`: the image stored two ways."""
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        views = 2 if self.cfg.consistency else 1
        if not self.cfg.storage_augment:
            storages = [augment.Storage()] * views
        elif views == 2:
            storages = list(augment.draw_pair(rng, self.prep.height, self.cfg.hflip))
        else:
            storages = [augment.draw(rng, self.cfg.hflip)]
        pixels = np.stack([augment.apply(self.images[i], storage, self.prep.height)
                           for storage in storages])
        x = torch.from_numpy(normalise(pixels, self.prep))
        return (x if views == 2 else x[0]), int(self.labels[i])


def epoch_loader(dataset: AugmentedImages, cfg: TrainConfig, epoch: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Shuffled with a per-epoch seed, so a resumed run sees the same order."""
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                       generator=generator, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=False,
                                       persistent_workers=False)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 2% of each group's initial learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Progress:
    """Prints steps, running loss, images/s and ETAs at most every `every` seconds."""
    log: Callable[[str], None]
    every: float
    epoch: int
    steps: int
    remaining_after: int  # steps in the epochs after this one
    started: float = field(default_factory=time.time)
    last: float = field(default_factory=time.time)

    def update(self, step: int, images: int, loss: float) -> None:
        now = time.time()
        if now - self.last < self.every and step < self.steps:
            return
        self.last = now
        rate = step / (now - self.started)
        epoch_left = (self.steps - step) / rate
        self.log(f"epoch {self.epoch} step {step}/{self.steps} loss {loss:.4f} "
                 f"{images / (now - self.started):.1f} images/s, epoch ETA "
                 f"{format_duration(epoch_left)}, run ETA "
                 f"{format_duration(epoch_left + self.remaining_after / rate)} (at this rate)")


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the logit margins of consecutive pairs of rows (one image
    stored two ways): the score should not depend on how a scan was stored."""
    margin = (logits[:, 1] - logits[:, 0]).float()
    return ((margin[0::2] - margin[1::2]) ** 2).mean()


def train_one_epoch(model: PneumoniaNet, open_stages: int, ema: AveragedModel | None,
                    criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                    batches, steps: int, device: torch.device, amp_dtype,
                    progress: Progress, consistency: float = 0.0) -> dict:
    """One pass over `steps` batches with the head and `open_stages` trunk stages
    training; returns the mean loss, images/s and seconds. Batches of image pairs
    (N, 2, C, H, W) add the `consistency` loss."""
    model.train()
    set_trainable(model, open_stages)
    started, losses, seen = time.time(), [], 0
    for step, (x, y) in zip(range(1, steps + 1), batches):
        paired = x.dim() == 5
        if paired:  # rows 2i and 2i + 1: image i stored two ways
            x, y = x.flatten(0, 1), y.repeat_interleave(2)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits, y)
            if paired:
                loss = loss + consistency * consistency_loss(logits)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(loss.item())
        seen += len(y)
        progress.update(step, seen, float(np.mean(losses[-50:])))
    seconds = time.time() - started
    return {"train_loss": float(np.mean(losses)), "seconds": seconds,
            "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, prep: Preprocessing, device: torch.device,
             batch_size: int, amp_dtype) -> np.ndarray:
    """Class logits (N, K) for uint8 (N, H, W) images, without augmentation."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[i:i + batch_size], prep)).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def pneumonia_probability(logits: np.ndarray, temperature: float = 1.0,
                          bias: float = 0.0) -> np.ndarray:
    """P(pneumonia) from (N, 2) logits, recalibrated: sigmoid(margin / T + bias)."""
    margin = torch.from_numpy(logits[:, 1] - logits[:, 0]).double()
    return torch.sigmoid(margin / temperature + bias).numpy()


def validation_row(logits: np.ndarray, labels: np.ndarray) -> dict:
    probs = pneumonia_probability(logits)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    m = binary_metrics(labels, probs, 0.5)
    return {"val_loss": float(loss), **{k: m[k] for k in ("accuracy", "sensitivity",
                                                         "specificity", "auc", "f1")}}


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling of the logit margin: the temperature T > 0 and bias b minimising the
    negative log-likelihood of sigmoid(margin / T + b), by L-BFGS. The temperature alone
    (Guo et al. 2017) cannot undo the class weights' shift of the prior; the bias does."""
    margin = torch.from_numpy(logits[:, 1] - logits[:, 0]).double()
    y = torch.from_numpy(labels).double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=200,
                                  line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(margin / log_t.exp() + bias, y)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp()), float(bias.detach())


def checkpoint_payload(state_dict, cfg, prep, epoch, history, threshold, val_metrics,
                       weights: str) -> dict:
    return {
        "format": "pneumoscan-checkpoint-1",
        "arch": cfg.arch,
        "class_names": list(CLASS_NAMES),
        "preprocessing": asdict(prep),
        "dropout": cfg.dropout,
        "low_pass_sigma": cfg.low_pass_sigma,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "weights": weights,
        "threshold": threshold,
        "metrics": val_metrics,
        "config": asdict(cfg),
        "epoch": epoch,
        "history": history,
        "data_description": f"{cfg.data} ({cfg.val_fraction:.0%} of patients held out for "
                            f"validation: {split_description(cfg)})",
    }


def split_description(cfg: TrainConfig) -> str:
    if cfg.val_split == "latest":
        return "the latest patients"
    return f"seed {cfg.seed}" + (f", fold {cfg.val_fold}" if cfg.val_fold else "")


def resume_state(model, ema, optimizer, scheduler) -> dict:
    """What last.pt adds to a checkpoint so that a run can continue."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema_state_dict": ema.state_dict() if ema is not None else None,
            "model_state_dict": model.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()}}


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
    train_samples, val_samples = split_by_patient(samples, cfg.val_fraction, cfg.seed,
                                                  fold=cfg.val_fold, how=cfg.val_split)
    (out / "split.json").write_text(json.dumps(
        {"train": [str(s.path) for s in train_samples],
         "val": [str(s.path) for s in val_samples]}, indent=0))
    t0 = time.time()
    train_x, train_y, problems = load_cached(train_samples, prep)
    val_x, val_y, val_problems = load_cached(val_samples, prep)
    val_patients = np.array([s.patient for s in val_samples  # those load_cached kept
                             if not any(p.startswith(f"{s.path}: ") for p in val_problems)])
    for p in problems + val_problems:
        log(f"left out {p}")
    log(f"data: {len(train_y)} train ({np.bincount(train_y, minlength=2).tolist()}), "
        f"{len(val_y)} val ({np.bincount(val_y, minlength=2).tolist()}) images from "
        f"{len({s.patient for s in train_samples})} + {len({s.patient for s in val_samples})} "
        f"patients, decoded in {time.time() - t0:.0f}s; device {device}")

    model = build_network(cfg.arch, num_classes=len(CLASS_NAMES), dropout=cfg.dropout,
                          weights=cfg.pretrained_weights, download=cfg.download_weights,
                          pretrained=cfg.pretrained, low_pass_sigma=cfg.low_pass_sigma)
    if cfg.init_from is not None:
        weights = read_checkpoint(Path(cfg.init_from))["state_dict"]
        # The low-pass kernel is not learnt: --low-pass-sigma sets it, so a fine-tune may
        # change the filter (or add or drop it) and keep every trained weight.
        weights.pop(LOW_PASS_KERNEL, None)
        keys = model.load_state_dict(weights, strict=False)
        if keys.unexpected_keys or set(keys.missing_keys) - {LOW_PASS_KERNEL}:
            raise ModelError(f"{cfg.init_from} does not fit --arch {cfg.arch}: missing "
                             f"{keys.missing_keys}, unexpected {keys.unexpected_keys}")
        log(f"weights from {cfg.init_from}")
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                        use_buffers=True) if cfg.ema_decay is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.stage_lr_decay,
                                               cfg.weight_decay))
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=steps_per_epoch * cfg.epochs,
                           warmup=cfg.warmup_steps))
    counts = np.bincount(train_y, minlength=2)
    class_weights = torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    dataset = AugmentedImages(train_x, train_y, prep, cfg)

    history: list[dict] = []
    best_auc, best_epoch, start_epoch = -1.0, 0, 1
    if resume is not None:
        state = read_checkpoint(resume)
        model.load_state_dict(state["model_state_dict"])
        if ema is not None:
            ema.load_state_dict(state["ema_state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best = max(history, key=lambda h: h["auc"])
        best_auc, best_epoch = best["auc"], best["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log(f"resumed from {resume} after epoch {state['epoch']}")

    for epoch in range(start_epoch, cfg.epochs + 1):
        n_open = open_stages_at(epoch, cfg.unfreeze_epochs, len(model.stages))
        progress = Progress(log, cfg.progress_seconds, epoch, steps_per_epoch,
                            steps_per_epoch * (cfg.epochs - epoch))
        trained = train_one_epoch(model, n_open, ema, criterion, optimizer, scheduler, scaler,
                                  epoch_loader(dataset, cfg, epoch, device), steps_per_epoch,
                                  device, amp_dtype, progress, cfg.consistency)
        candidates = {"weights": model} | ({"ema": ema.module} if ema is not None else {})
        logits = {name: evaluate(net, val_x, prep, device, cfg.batch_size * 2, amp_dtype)
                  for name, net in candidates.items()}
        rows = {name: validation_row(lg, val_y) for name, lg in logits.items()}
        chosen = max(rows, key=lambda name: rows[name]["auc"])
        row = {"epoch": epoch, "open_stages": n_open, "train_loss": trained["train_loss"],
               **rows[chosen], "evaluated": chosen,
               **({"ema_auc": rows["ema"]["auc"], "weights_auc": rows["weights"]["auc"]}
                  if ema is not None else {}),
               "lr": optimizer.param_groups[0]["lr"], "seconds": trained["seconds"],
               "images_per_s": trained["images_per_s"]}
        history.append(row)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        val_prob = pneumonia_probability(logits[chosen])
        threshold = choose_threshold(val_y, val_prob, cfg.min_sensitivity)
        val_metrics = {"at_0.5": binary_metrics(val_y, val_prob, 0.5),
                       "at_threshold": binary_metrics(val_y, val_prob, threshold),
                       "n_val": int(len(val_y))}
        payload = checkpoint_payload(candidates[chosen].state_dict(), cfg, prep, epoch, history,
                                     threshold, val_metrics, chosen)
        save_atomic(payload | resume_state(model, ema, optimizer, scheduler), out / "last.pt")
        if row["auc"] > best_auc:
            best_auc, best_epoch = row["auc"], epoch
            save_atomic(payload, out / "best.pt")
            np.savez(out / "val_predictions.npz", labels=val_y, logits=logits[chosen],
                     patients=val_patients)
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
    """Calibrate the best checkpoint, then its metrics with bootstrap CIs, and plots.

    Temperature and bias are fitted on the validation logits and recorded in the checkpoint;
    `load_network` folds them into the linear head, so the ONNX export and every other
    consumer get calibrated probabilities. Decisions do not change: the threshold is chosen
    on the recalibrated probabilities, which keep their order."""
    from pneumoscan.evaluation.plots import write_plots

    best = read_checkpoint(out / "best.pt")
    preds = np.load(out / "val_predictions.npz")
    labels, logits = preds["labels"], preds["logits"]
    patients = preds["patients"] if "patients" in preds else split_patients(out)
    temperature, bias = fit_calibration(logits, labels)
    uncalibrated = pneumonia_probability(logits)
    probs = pneumonia_probability(logits, temperature, bias)
    threshold = choose_threshold(labels, probs, cfg.min_sensitivity)
    # Judged on patients it was not fitted on: fitted on the same images, Platt scaling
    # has calibration slope 1 and intercept 0 by construction.
    held_out = cross_fitted_probabilities(logits, labels, patients, cfg.seed)
    calibration = {"method": "Platt scaling of the logit margin (temperature and bias), "
                             "fitted on the validation split",
                   "temperature": temperature, "bias": bias,
                   "ece_before": expected_calibration_error(labels, uncalibrated),
                   "ece_after": expected_calibration_error(labels, probs),
                   "ece_after_cross_fitted": expected_calibration_error(labels, held_out)}
    summary = {
        "arch": cfg.arch, "best_epoch": best["epoch"], "weights": best["weights"],
        "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= {cfg.min_sensitivity}",
        "calibration": calibration,
        "calibration_cross_fitted": {
            "method": "each half of the validation patients recalibrated with what was "
                      "fitted on the other half; 95% CIs by patient bootstrap",
            **calibration_metrics(labels, held_out),
            "ci95": calibration_intervals(labels, held_out, groups=patients)},
        "validation": binary_metrics(labels, probs, threshold),
        "validation_ci95": bootstrap_intervals(labels, probs, threshold, groups=patients),
        "validation_cross_fitted_threshold": cross_fitted_operating_point(
            labels, probs, patients, cfg.min_sensitivity, seed=cfg.seed),
        "n_val": int(len(labels)), "n_val_patients": int(len(set(patients.tolist()))),
    }
    best["threshold"], best["calibration"] = threshold, calibration
    best["metrics"] = {"at_0.5": binary_metrics(labels, probs, 0.5),
                       "at_threshold": summary["validation"],
                       "ci95": summary["validation_ci95"], "n_val": int(len(labels))}
    save_atomic(best, out / "best.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_plots(best["history"], labels, probs, threshold, out, uncalibrated=uncalibrated)
    return summary


def cross_fitted_probabilities(logits: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                               seed: int) -> np.ndarray:
    """Calibrated probabilities judged on patients the recalibration was not fitted on: the
    patients cut in two halves, each half recalibrated with what was fitted on the other."""
    _, inverse = np.unique(patients, return_inverse=True)
    half = (np.random.default_rng(seed).permutation(inverse.max() + 1) % 2)[inverse] == 1
    probs = np.empty(len(labels))
    for fit, judge in ((half, ~half), (~half, half)):
        probs[judge] = pneumonia_probability(logits[judge],
                                             *fit_calibration(logits[fit], labels[fit]))
    return probs


def split_patients(out: Path) -> np.ndarray:
    """The validation images' patients, from the split.json of a run whose predictions
    file predates recording them (every validation image was readable)."""
    val = json.loads((out / "split.json").read_text())["val"]
    return np.array([patient_id(Path(path)) for path in val])


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path | None]:
    """One option per TrainConfig field, named, typed and defaulted from it."""
    p = argparse.ArgumentParser(prog="python -m training.train",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        options = {"help": f.metadata["help"]}
        if f.default is MISSING:
            options.update(required=True, default=argparse.SUPPRESS)
        elif kind == tuple[int, ...]:
            options["default"] = ",".join(map(str, f.default))  # parsed by int_tuple
        else:
            options["default"] = f.default
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind == tuple[int, ...]:
            options["type"] = int_tuple
        else:
            base = next((t for t in get_args(kind) if t is not type(None)), kind)
            options["type"] = optional(base) if base is not kind else base
        p.add_argument(flag, **options)
    p.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    cfg = TrainConfig(**a)
    try:  # the split's own check, before minutes of decoding
        split_by_patient([], cfg.val_fraction, cfg.seed, fold=cfg.val_fold, how=cfg.val_split)
    except ValueError as exc:
        p.error(str(exc))
    return cfg, resume


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def optional(kind: type) -> Callable[[str], object]:
    """`kind`, or None written as 'none'."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        train(cfg, resume, log=lambda msg: print(msg, flush=True))
    except ModelError as exc:  # a checkpoint to start or resume from that does not serve
        print(f"training: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
