"""The training loop: SGD (or AdamW) with warm-up + cosine, held-out evaluation, atomic best/last checkpoints, exact
resume, mixed precision, channels_last, torch.compile and DistributedDataParallel under ``torchrun``.

Outputs in ``cfg.output`` (written by rank 0 only):

* ``best.safetensors``: the deployable checkpoint with the best held-out top-1 (what ``ganet-export`` reads);
* ``last.safetensors``: the latest epoch's weights, same format;
* ``last.state.safetensors``: weights, optimizer state (SGD's momentum or AdamW's moments), gradient-scaler state
  and the loop's position, in one atomic file, so a kill at any moment leaves a consistent state to resume from
  (``--resume DIR``);
* ``metrics.jsonl``: one JSON line per epoch (loss, top-1, top-5, learning rate, images/s, skipped images);
* ``config.json``: the resolved configuration; ``tensorboard/``: the same metrics as TensorBoard events.

Every epoch's order and augmentation come from a CPU generator seeded with ``(seed, epoch)``, and the learning rate
is a pure function of the step, so a resumed run replays exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ganet._io import atomic_write_bytes
from ganet.checkpoint import CheckpointError, load_checkpoint, read_tensor_file_header, save_checkpoint
from ganet.models import create_model
from ganet.preprocess import Preprocessing
from ganet.system import usable_cpus
from ganet.train.config import TrainConfig
from ganet.train.data import DataSplit, ImageTensors, augment, draw_augmentation, preprocess_batch

if TYPE_CHECKING:  # imported where used: tensorboard loads slowly
    from torch.utils.tensorboard import SummaryWriter

STATE_FILE = "last.state.safetensors"
Batch = tuple[torch.Tensor, torch.Tensor, list]  # images (B, 3, S, S) float, targets (B,), skipped [(path, why)]


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
    epoch_s: float
    skipped_images: int


# ---------------------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where this process runs: its device, and its rank among ``world`` torchrun processes."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over all processes (identity in a single process)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device; under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU (use --device cpu)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world == 1:
        return Runtime(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} torchrun processes")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), world)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up to cfg.lr, then cosine to 0 at the last step."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------------------------- batches
class MemoryBatches:
    """An in-memory uint8 data set (digits, CIFAR) kept on the training device.

    Each step gathers its images there, normalises and augments them there: no loader process feeds the GPU, and
    50,000 CIFAR images take 150 MB. Training batches are global batches sliced by rank, so N processes see exactly
    the images and augmentation one process would; held-out batches are each rank's interleaved shard.
    """

    def __init__(self, data: ImageTensors, prep: Preprocessing, rt: Runtime, batch_size: int, *, train: bool,
                 cfg: TrainConfig) -> None:
        images, targets = (data.images, data.targets) if train else \
            (data.images[rt.rank::rt.world], data.targets[rt.rank::rt.world])
        self.images, self.targets = images.to(rt.device), targets.to(rt.device)
        self.prep, self.rt, self.batch_size, self.train, self.cfg = prep, rt, batch_size, train, cfg
        if not train:
            self.steps = math.ceil(len(self.targets) / batch_size)
        elif rt.world > 1:  # a short last global batch could leave a rank with no image (a NaN loss, all-reduced)
            self.steps = len(data) // batch_size
        else:
            self.steps = math.ceil(len(data) / batch_size)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> Iterator[Batch]:
        if not self.train:
            for i in range(0, len(self.targets), self.batch_size):
                yield preprocess_batch(self.images[i:i + self.batch_size], self.prep), \
                    self.targets[i:i + self.batch_size], []
            return
        cfg, rt = self.cfg, self.rt
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(self.targets), generator=generator)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            offsets, flips = draw_augmentation(len(idx), cfg.max_shift, cfg.hflip, generator)
            mine = slice(rt.rank, None, rt.world)
            idx = idx[mine].to(rt.device)
            x = preprocess_batch(self.images[idx], self.prep)
            yield augment(x, offsets[mine], flips[mine], cfg.max_shift), self.targets[idx], []


class FolderBatches:
    """An image folder streamed by DataLoader workers; corrupt images arrive as (path, reason) beside each batch."""

    def __init__(self, dataset, rt: Runtime, batch_size: int, *, train: bool, cfg: TrainConfig) -> None:
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        from ganet.train.datasets import collate_skip_bad

        self.rt, self.train = rt, train
        self.sampler = None
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=rt.world, rank=rt.rank, shuffle=True,
                                              seed=cfg.seed, drop_last=True)
        else:  # interleaved shards: every held-out image counted exactly once
            dataset = Subset(dataset, range(rt.rank, len(dataset), rt.world))
        self.seed = cfg.seed
        # Workers are started afresh every epoch from a generator seeded with (seed, epoch), so the augmentation
        # of a resumed run replays an uninterrupted one's.
        with _no_worker_count_warning():
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=cfg.workers,
                                     collate_fn=collate_skip_bad, pin_memory=rt.device.type == "cuda",
                                     drop_last=train, generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.loader.generator.manual_seed(self.seed * 100_003 + epoch)
        if self.loader.num_workers == 0:  # transforms then draw from this process's global generator
            torch.manual_seed(self.seed * 100_003 + epoch)
        with _no_worker_count_warning():
            batches = iter(self.loader)  # (starts the workers)
        for x, y, bad in batches:
            yield x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True), bad


@contextmanager
def _no_worker_count_warning() -> Iterator[None]:
    """Silence DataLoader's warning about more workers than CPUs: it came twice for each loader, and again every
    epoch; fit() says it once instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


def make_batches(data, prep: Preprocessing, rt: Runtime, cfg: TrainConfig, *, train: bool,
                 eval_batch_size: int = 256) -> MemoryBatches | FolderBatches:
    split = data.train if train else data.val
    if isinstance(split, ImageTensors):
        return MemoryBatches(split, prep, rt, cfg.batch_size if train else eval_batch_size, train=train, cfg=cfg)
    return FolderBatches(split, rt, cfg.batch_size // rt.world if train else eval_batch_size, train=train, cfg=cfg)


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches, rt: Runtime, amp: torch.dtype | None = None,
             channels_last: bool = False, strict: bool = False) -> tuple[float, float, float, int]:
    """(loss, top-1, top-5, images) over the held-out ``batches``, summed across all processes; corrupt held-out
    images are reported and left out (or stop the run when ``strict``)."""
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss, top-1 hits, top-5 hits
    n = 0
    for x, y, bad in batches.batches(0):
        if bad:
            _handle_bad_images(bad, strict)
        if len(y) == 0:
            continue
        with torch.autocast(rt.device.type, dtype=amp, enabled=amp is not None):
            logits = model(x.contiguous(memory_format=fmt)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             (top[:, 0] == y).sum().double(), (top == y[:, None]).any(dim=1).sum().double()])
        n += len(y)
    loss, c1, c5, n = rt.all_sum(sums.tolist() + [n])
    if n == 0:
        from ganet.train.datasets import CorruptImageError

        raise CorruptImageError("the held-out split", "none of its images could be decoded")
    return loss / n, c1 / n, c5 / n, int(n)


def evaluate_checkpoint(path: str | Path, cfg: TrainConfig) -> dict:
    """Top-1/top-5 of a checkpoint on ``cfg.data``'s held-out split, preprocessed by the checkpoint's own definition."""
    from ganet.train.datasets import build_dataset, load_imagefolder

    rt = setup_runtime(cfg)
    model, info = load_checkpoint(path, rt.device)
    prep = info.preprocessing
    if cfg.data == "imagefolder":
        data = load_imagefolder(cfg.data_dir, prep, strict=cfg.strict)
    else:
        data = build_dataset(cfg.data, data_dir=cfg.data_dir, input_size=prep.input_size, download=cfg.download)
    if len(data.labels) != info.num_classes:
        raise ValueError(f"{path} has {info.num_classes} classes but {cfg.data} has {len(data.labels)}")
    batches = make_batches(data, prep, rt, cfg, train=False)
    loss, top1, top5, n = evaluate(model, batches, rt, autocast_dtype(cfg, rt.device), strict=cfg.strict)
    return {"checkpoint": str(path), "data": cfg.data, "images": n, "loss": loss, "top1": top1, "top5": top5}


# ------------------------------------------------------------------------------------------------ model and state
def load_matching_weights(model: nn.Module, path: str | Path, log: Callable[[str], None]) -> None:
    """Copy every tensor of checkpoint ``path`` whose name and shape match ``model``'s; the rest stay fresh."""
    source, _ = load_checkpoint(path)
    theirs, mine = source.state_dict(), model.state_dict()
    matched = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    if not matched:
        raise ValueError(f"init checkpoint {path}: no tensor matches {type(model).__name__}'s names and shapes")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(set(mine) - set(matched))
    log(f"initialised {len(matched)}/{len(mine)} tensors from {path}"
        + (f"; fresh: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}" if fresh else ""))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


# Per-parameter optimizer state in the resume file: state key -> tensor name prefix. SGD keeps "momentum." (the
# name resume files have always used); AdamW's step counts are 0-d tensors.
_OPTIMIZER_STATE = {"sgd": {"momentum_buffer": "momentum"},
                    "adamw": {"exp_avg": "adamw_exp_avg", "exp_avg_sq": "adamw_exp_avg_sq", "step": "adamw_step"}}


def _state_prefixes(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    return _OPTIMIZER_STATE["adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd"]


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                epoch: int, best_top1: float, metrics_line: str) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    prefixes = _state_prefixes(optimizer)
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if key in prefixes and value is not None:
                tensors[f"{prefixes[key]}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    # The epoch's metrics.jsonl line rides along: a kill between this save and its append cannot lose it.
    meta = {"epochs_done": str(epoch + 1), "best_top1": repr(best_top1), "scaler": json.dumps(scaler.state_dict()),
            "metrics": metrics_line}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler) -> tuple[int, float, str | None]:
    """Restore model, optimizer state and scaler; (epochs done, best top-1, the last epoch's metrics line)."""
    if not path.is_file():
        raise ValueError(f"cannot resume: {path} does not exist (the run stopped before its first epoch ended)")
    entries, meta = read_tensor_file_header(path)  # a corrupt file: CheckpointError naming it, before any load
    mine = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    prefixes = _state_prefixes(optimizer)
    for key, prefix in prefixes.items():
        mine |= {f"{prefix}.{k}": () if key == "step" else tuple(p.shape) for k, p in params.items()}
    misfit = [k for k, e in entries.items() if mine.get(k) != e.shape] + \
        [k for k in mine if k.startswith("model.") and k not in entries]
    if misfit:
        raise CheckpointError(path, f"does not fit model {type(model).__name__} of this config ({len(misfit)} tensors "
                                    f"missing, unknown or of another shape, e.g. {misfit[0][:80]}); resume with the "
                                    "run's own --model")
    try:
        done, best, scaler_state = int(meta["epochs_done"]), float(meta["best_top1"]), meta.get("scaler")
        scaler_state = json.loads(scaler_state) if scaler_state else None
    except (KeyError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"invalid resume state metadata ({type(e).__name__}: {e})") from None
    device = next(model.parameters()).device
    tensors = load_file(str(path), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    by_prefix = {prefix: key for key, prefix in prefixes.items()}
    for k, v in tensors.items():
        prefix, _, name = k.partition(".")
        if prefix in by_prefix:
            # AdamW keeps its step count on the CPU unless capturable: as it was saved
            optimizer.state[params[name]][by_prefix[prefix]] = v.cpu() if by_prefix[prefix] == "step" else v
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    return done, best, meta.get("metrics")


def _metrics_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line torn by a kill (so resume drops it)."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Progress:
    """A tqdm bar (loss, images/s, ETA) on a terminal; nothing in logs or on other ranks."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)

    @property
    def shown(self) -> bool:
        return self.bar is not None

    def update(self, loss: float | None, images_per_s: float) -> None:
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------------ fit
def fit(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
        data: DataSplit | None = None) -> Path:
    """Train ``cfg.model`` on ``cfg.data`` (or on ``data`` given in memory); returns the path of best.safetensors.

    Nothing is written before the first epoch ends: a run that is refused or fails before then (bad config, missing
    data, a NaN loss or a corrupt image in a --strict first epoch) leaves no output folder and no file behind.
    """
    cfg, schedule_note = cfg.fitted_schedule()
    cfg.validate(check_data=data is None)
    rt = setup_runtime(cfg)
    log = log if rt.is_main else (lambda *_: None)
    if schedule_note:
        log(schedule_note)
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    if data is None:
        from ganet.train.datasets import build_dataset

        data = build_dataset(cfg.data, data_dir=cfg.data_dir, input_size=cfg.input_size, download=cfg.download,
                             strict=cfg.strict)
    cfg = _fitted_batch(cfg, len(data.train), rt, log)
    if not isinstance(data.train, ImageTensors) and cfg.workers > usable_cpus():
        log(f"--workers {cfg.workers} is more than the {usable_cpus()} CPUs this process may use: image decoding may "
            f"slow down rather than speed up (the default is {min(4, usable_cpus())} here)")
    prep = data.preprocessing
    train_batches = make_batches(data, prep, rt, cfg, train=True)
    val_batches = make_batches(data, prep, rt, cfg, train=False)
    steps_per_epoch = len(train_batches)

    model = create_model(cfg.model, num_classes=len(data.labels))
    if cfg.init and not resume:
        load_matching_weights(model, cfg.init, log)
    if cfg.sync_bn and rt.world > 1:
        if rt.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(rt.device, memory_format=fmt)
    optimizer = make_optimizer(cfg, model)
    amp = autocast_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp is torch.float16)

    start_epoch, best_top1, last_metrics = 0, -1.0, None
    metrics_path = out / "metrics.jsonl"
    if resume:
        start_epoch, best_top1, last_metrics = _load_state(out / STATE_FILE, model, optimizer, scaler)
        log(f"resuming {out} after epoch {start_epoch} (best top-1 so far {best_top1:.4f})")
    step_model: nn.Module = model
    if rt.world > 1:
        # static_graph: the graph never changes, and the GA blocks' conv biases, which their normalisation removes
        # exactly, never get a gradient; DDP then learns that once instead of failing or searching every step.
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None, static_graph=True)
    if cfg.compile:
        step_model = torch.compile(step_model)

    writer = None  # a fresh run opens its outputs when its first epoch ends; a resumed one has them already
    if rt.is_main and resume:
        writer = _open_outputs(out, cfg, resume, start_epoch, last_metrics)
    checkpoint_args = dict(model_name=cfg.model, labels=data.labels, preprocessing=prep)
    data_record = data_provenance(cfg)
    check_every = 1 if rt.device.type == "cpu" else 50  # a finiteness check syncs the GPU: do it now and then

    for epoch in range(start_epoch, cfg.epochs):
        step_model.train()
        t0, seen, skipped = time.perf_counter(), 0, []
        loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", rt.is_main)
        for i, (x, y, bad) in enumerate(train_batches.batches(epoch)):
            if bad:
                _handle_bad_images(bad, cfg.strict)
                skipped += bad
                if len(y) == 0:  # every image of this batch was corrupt
                    if rt.world > 1:  # skipping on one rank would desynchronise DDP's all-reduce: stop instead
                        from ganet.train.datasets import CorruptImageError

                        raise CorruptImageError(bad[0][0], f"rank {rt.rank}: every image of step {i + 1} is corrupt "
                                                "and a step cannot be skipped on one process of several; remove the "
                                                "files named above")
                    continue
            lr = learning_rate(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(rt.device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(step_model(x.contiguous(memory_format=fmt)), y,
                                       label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            if (i + 1) % check_every == 0 or i + 1 == steps_per_epoch:
                finite = rt.all_sum([float(not torch.isfinite(loss_sum))])[0] == 0
                if not finite:
                    bar.close()
                    kept = (f"the last good checkpoint is {out / 'last.safetensors'}" if epoch > 0
                            else "no checkpoint was written")
                    raise NonFiniteLossError(f"loss is not finite at epoch {epoch + 1}, step {i + 1}; {kept} (try a "
                                             f"lower --lr{', or --amp bf16' if amp else ''})")
            # loss.item() waits for the GPU: only when a bar will show it
            bar.update(loss.item() if bar.shown and i % 10 == 0 else None, seen * rt.world / (time.perf_counter() - t0))
        bar.close()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        epoch_s = time.perf_counter() - t0
        train_loss, total_seen, n_skipped = rt.all_sum([loss_sum.item(), seen, len(skipped)])
        if total_seen == 0:
            from ganet.train.datasets import CorruptImageError

            raise CorruptImageError(cfg.data_dir, f"no training image of epoch {epoch + 1} could be decoded "
                                    f"({int(n_skipped)} skipped)")
        val_loss, top1, top5, _ = evaluate(model, val_batches, rt, amp, cfg.channels_last, cfg.strict)
        m = EpochMetrics(epoch, train_loss / total_seen, val_loss, top1, top5, lr, total_seen / epoch_s, epoch_s,
                         int(n_skipped))
        if rt.is_main:
            if writer is None:
                writer = _open_outputs(out, cfg, resume, start_epoch, last_metrics)
            extra = {"epoch": epoch + 1, "top1": top1, "top5": top5} | data_record
            save_checkpoint(out / "last.safetensors", model, extra=extra, **checkpoint_args)
            if top1 > best_top1:
                save_checkpoint(out / "best.safetensors", model, extra=extra, **checkpoint_args)
            line = json.dumps(m.__dict__)
            _save_state(out / STATE_FILE, model, optimizer, scaler, epoch, max(best_top1, top1), line)
            with metrics_path.open("a") as f:
                f.write(line + "\n")
            for key in ("train_loss", "val_loss", "top1", "top5", "lr", "images_per_s"):
                writer.add_scalar(key, getattr(m, key), epoch + 1)
            writer.flush()
        best_top1 = max(best_top1, top1)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {m.train_loss:.4f}  held-out top-1 {top1:.4f}  top-5 {top5:.4f}  "
            f"lr {lr:.4f}  {m.images_per_s:.0f} img/s" + (f"  skipped {m.skipped_images} corrupt images"
                                                          if m.skipped_images else ""))
    if writer is not None:
        writer.close()
    if rt.world > 1:
        dist.barrier()
    return out / "best.safetensors"


def data_provenance(cfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint records about its data, so that ganet-export can reach the same held-out split: the data
    set's name and, for data on disk, its folder as an absolute path."""
    record = {"data": cfg.data}
    if cfg.data != "digits":
        record["data_dir"] = str(Path(cfg.data_dir).expanduser().resolve())
    return record


def _fitted_batch(cfg: TrainConfig, n_train: int, rt: Runtime, log: Callable[[str], None]) -> TrainConfig:
    """``cfg`` with a batch no larger than the training set (rounded down to a multiple of the processes), so that a
    small data set still has a full step per epoch; says so when it changes anything."""
    if cfg.batch_size <= n_train:
        return cfg
    batch = n_train // rt.world * rt.world
    if batch < 1:
        raise ValueError(f"the training set has {n_train} images, fewer than the {rt.world} torchrun processes")
    log(f"batch size {cfg.batch_size} is more than the {n_train} training images: training with batches of "
        f"{batch}, one step per epoch")
    return cfg.replace({"batch_size": batch})


def _open_outputs(out: Path, cfg: TrainConfig, resume: bool, start_epoch: int,
                  last_metrics: str | None) -> SummaryWriter:
    """Create the run's files once its first epoch has ended: config.json, metrics.jsonl (trimmed to the saved
    state on resume) and the TensorBoard writer."""
    from torch.utils.tensorboard import SummaryWriter

    metrics_path = out / "metrics.jsonl"
    if resume:  # drop what the killed run logged after its last saved epoch
        # Lines before the saved epoch, then the saved epoch's own line from the state (whether or not the
        # killed run appended it); a torn or later line is dropped: those epochs run again.
        cut = start_epoch - 1 if last_metrics else start_epoch  # (state files from before the line rode along)
        kept = [line for line in metrics_path.read_text().splitlines()
                if _metrics_epoch(line) < cut] if metrics_path.exists() else []
        kept += [last_metrics] if last_metrics else []
        atomic_write_bytes(metrics_path, "".join(line + "\n" for line in kept).encode())
    else:
        metrics_path.unlink(missing_ok=True)
    atomic_write_bytes(out / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    return SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch + 1 if resume else None)


def _handle_bad_images(bad: list, strict: bool) -> None:
    from ganet.train.datasets import CorruptImageError

    if strict:
        raise CorruptImageError(*bad[0])
    for path, reason in bad:
        print(f"ganet-train: skipping corrupt image {path}: {reason}", file=sys.stderr)
