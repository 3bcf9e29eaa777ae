"""The training loop: SGD with warm-up + cosine, held-out evaluation, atomic best/last checkpoints, exact resume.

Outputs in ``cfg.output``:

* ``best.safetensors``: the deployable checkpoint with the best held-out top-1 (what ``ganet-export`` reads);
* ``last.safetensors``: the latest epoch's weights, same format;
* ``last.state.safetensors``: weights and optimizer momentum plus the loop's position, written in one atomic file so
  a kill at any moment leaves a consistent pair to resume from (``--resume DIR``);
* ``metrics.jsonl``: one JSON line per epoch (loss, top-1, top-5, learning rate, images/s);
* ``config.json``: the resolved configuration.

Every epoch's order and augmentation come from a generator seeded with ``(seed, epoch)``, and the learning rate is a
pure function of the step, so a resumed run replays exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ganet._io import atomic_write_bytes
from ganet.checkpoint import save_checkpoint
from ganet.models import create_model
from ganet.train.config import TrainConfig
from ganet.train.data import DataSplit, load_digits, preprocess_batch, random_shift

STATE_FILE = "last.state.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    top1: float
    top5: float
    lr: float
    images_per_s: float


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up to cfg.lr, then cosine to 0 at the last step."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             batch_size: int = 256) -> tuple[float, float, float]:
    """(loss, top-1, top-5) on preprocessed ``inputs`` (N, 3, S, S) with ``targets`` (N,)."""
    model.eval()
    loss = correct1 = correct5 = 0.0
    for i in range(0, len(targets), batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    n = len(targets)
    return loss / n, correct1 / n, correct5 / n


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, best_top1: float) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{names[id(p)]}"] = buf.contiguous()
    meta = {"epochs_done": str(epoch + 1), "best_top1": repr(best_top1)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("momentum."):
            optimizer.state[params[k[9:]]]["momentum_buffer"] = v
    return int(meta["epochs_done"]), float(meta["best_top1"])


def build_data(cfg: TrainConfig) -> DataSplit:
    return load_digits(cfg.input_size)


def fit(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Train ``cfg.model`` on ``cfg.data``; returns the path of ``best.safetensors``."""
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    prep = data.preprocessing
    model = create_model(cfg.model, num_classes=len(data.labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    # The data sets fit in memory: apply the deterministic preprocessing once, not every epoch.
    train_inputs = preprocess_batch(data.train.images, prep)  # (N, 3, S, S) float32
    val_inputs = preprocess_batch(data.val.images, prep)

    start_epoch, best_top1 = 0, -1.0
    metrics_path = out / "metrics.jsonl"
    if resume:
        start_epoch, best_top1 = _load_state(out / STATE_FILE, model, optimizer)
        kept = [line for line in metrics_path.read_text().splitlines()
                if json.loads(line)["epoch"] < start_epoch] if metrics_path.exists() else []
        atomic_write_bytes(metrics_path, "".join(line + "\n" for line in kept).encode())
        log(f"resuming {out} after epoch {start_epoch} (best top-1 so far {best_top1:.4f})")
    else:
        metrics_path.unlink(missing_ok=True)
    atomic_write_bytes(out / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    checkpoint_args = dict(model_name=cfg.model, labels=data.labels, preprocessing=prep)

    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(data.train), generator=generator)
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for i in range(steps_per_epoch):
            lr = learning_rate(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = random_shift(train_inputs[idx], cfg.max_shift, generator)
            loss = F.cross_entropy(model(x), data.train.targets[idx], label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; the last good "
                                         f"checkpoint is {out / 'last.safetensors'} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
        images_per_s = seen / (time.perf_counter() - t0)
        val_loss, top1, top5 = evaluate(model, val_inputs, data.val.targets)
        m = EpochMetrics(epoch, loss_sum / seen, val_loss, top1, top5, lr, images_per_s)
        save_checkpoint(out / "last.safetensors", model, extra={"epoch": epoch + 1, "top1": top1}, **checkpoint_args)
        if top1 > best_top1:
            best_top1 = top1
            save_checkpoint(out / "best.safetensors", model, extra={"epoch": epoch + 1, "top1": top1},
                            **checkpoint_args)
        _save_state(out / STATE_FILE, model, optimizer, epoch, best_top1)
        with metrics_path.open("a") as f:
            f.write(json.dumps(m.__dict__) + "\n")
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {m.train_loss:.4f}  held-out top-1 {top1:.4f}  top-5 {top5:.4f}  "
            f"lr {lr:.4f}  {images_per_s:.0f} img/s")
    return out / "best.safetensors"
