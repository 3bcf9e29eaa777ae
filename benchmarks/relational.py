"""The paper's claim where it can be tested here: does the GA block give a network the *pairwise* reach of non-local
attention? Trained on the same-different data set (two glyphs farther apart than the plain backbone sees; are they
the same?), the plain RelNet cannot beat chance, by construction; a block that relates distant pixels can.

Trains every variant of the RelNet family (plain, SE, SGE, NL, GNL, GA and GA's Table 2 ablations, all at the same
widths) for several seeds with ``ganet-train``'s own loop (``fit()``, the ``same-different`` preset), and reports the
held-out top-1 (mean, sample standard deviation and range over seeds), the last epoch's training loss, parameters,
MACs (``ganet.profile.count_macs``) and time per training step, plus a figure: final accuracy per seed and the
held-out learning curves. Runs go to ``--jobs`` worker processes of one thread each (two threads of one process stall
each other on a shared 2-core machine), longest first.

    python benchmarks/relational.py                        # 9 variants x 3 seeds, about 20 minutes on 2 cores
    python benchmarks/relational.py --variants relnet,nl_relnet --seeds 1 --epochs 2     # a quick look

Writes results.json, table.md and relational.png to --output (benchmarks/results/relational by default).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ganet._io import atomic_write_bytes

# (registered model, label); the order of the table and the figure
VARIANTS = {
    "relnet": "plain",
    "se_relnet": "SE",
    "sge_relnet": "SGE",
    "nl_relnet": "NL",
    "gnl_relnet": "GNL",
    "ga_relnet": "GA",
    "ga_relnet_no_u4u": "GA -U4U",
    "ga_relnet_no_u4p": "GA -U4P",
    "ga_relnet_no_norm": "GA -Normalize",
}
PRESET = "same-different"
CHANCE = 0.5

_DATA: dict = {}  # one generated data set per worker process, keyed by its sizes


def train_one(model: str, seed: int, overrides: dict) -> dict:
    """One run of ``fit()`` in this worker: per-epoch metrics, final held-out top-1 and seconds per step."""
    import torch

    from ganet.train.config import resolve_config
    from ganet.train.engine import fit
    from ganet.train.same_different import load_same_different

    torch.set_num_threads(1)
    sizes = (overrides.pop("train_size"), overrides.pop("holdout"))
    if sizes not in _DATA:
        _DATA[sizes] = load_same_different(train_size=sizes[0], holdout=sizes[1])
    with tempfile.TemporaryDirectory(prefix="relational-") as out:
        cfg = resolve_config(PRESET, overrides=overrides | {"model": model, "seed": seed, "output": out,
                                                             "device": "cpu"})
        t0 = time.perf_counter()
        fit(cfg, data=_DATA[sizes], log=lambda *_: None)
        wall = time.perf_counter() - t0
        epochs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    per_step = [cfg.batch_size / e["images_per_s"] for e in epochs]
    return {"model": model, "seed": seed, "top1": epochs[-1]["top1"], "train_loss": epochs[-1]["train_loss"],
            "curve": [e["top1"] for e in epochs], "train_curve": [e["train_loss"] for e in epochs],
            "step_s": statistics.median(per_step), "wall_s": wall}


def model_costs(model: str) -> dict:
    import torch

    from ganet.models import create_model
    from ganet.profile import count_macs

    net = create_model(model, num_classes=2)
    torch.set_num_threads(1)
    return {"params": sum(p.numel() for p in net.parameters()), "macs": count_macs(net, (1, 3, 32, 32))}


def summarise(runs: list[dict], costs: dict[str, dict], variants: list[str]) -> list[dict]:
    rows = []
    for model in variants:
        mine = sorted((r for r in runs if r["model"] == model), key=lambda r: r["seed"])
        acc = [r["top1"] for r in mine]
        rows.append({
            "model": model, "label": VARIANTS[model], **costs[model],
            "top1_mean": statistics.fmean(acc), "top1_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "top1_min": min(acc), "top1_max": max(acc), "top1_per_seed": acc,
            "train_loss_mean": statistics.fmean(r["train_loss"] for r in mine),
            "step_ms": 1e3 * statistics.median(r["step_s"] for r in mine),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | model | params | MMACs | ms / step | held-out top-1, mean ± sd | per seed | "
             "final train loss |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        seeds = ", ".join(f"{a:.3f}" for a in r["top1_per_seed"])
        lines.append(f"| {r['label']} | `{r['model']}` | {r['params']:,} | {r['macs'] / 1e6:.2f} | "
                     f"{r['step_ms']:.0f} | {r['top1_mean']:.3f} ± {r['top1_sd']:.3f} | {seeds} | "
                     f"{r['train_loss_mean']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
    colours = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        left.scatter([i] * len(r["top1_per_seed"]), r["top1_per_seed"], color=colours(i), s=18, alpha=0.7)
        left.errorbar([i], [r["top1_mean"]], yerr=[r["top1_sd"]], fmt="_", color="black", markersize=14, capsize=3)
        curves = [run["curve"] for run in runs if run["model"] == r["model"]]
        mean = [statistics.fmean(c[e] for c in curves) for e in range(len(curves[0]))]
        right.plot(range(1, len(mean) + 1), mean, color=colours(i), label=r["label"],
                   linestyle="--" if r["label"].startswith("GA -") else "-")
    for ax in (left, right):
        ax.axhline(CHANCE, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(0.4, 1.02)
        ax.grid(alpha=0.3)
    left.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right")
    left.set_ylabel("held-out top-1 (last epoch)")
    left.set_title("each seed; bar: mean ± sd", fontsize=9)
    right.set_xlabel("epoch")
    right.set_ylabel("held-out top-1, mean over seeds")
    right.legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated RelNet models to train (default: all nine)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: the data set's)")
    parser.add_argument("--holdout", type=int, default=None, help="held-out images (default: the data set's)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: %(default)s)")
    parser.add_argument("--output", default="benchmarks/results/relational", help="folder for the results")
    args = parser.parse_args(argv)

    from ganet.train.presets import get_preset
    from ganet.train.same_different import HOLDOUT, TRAIN_SIZE

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"relational.py: unknown variants {unknown}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        print("relational.py: --seeds, --jobs and --epochs must be >= 1", file=sys.stderr)
        return 2
    overrides = {"train_size": args.train_size or TRAIN_SIZE, "holdout": args.holdout or HOLDOUT}
    if args.epochs:
        overrides["epochs"] = args.epochs
        overrides["warmup_epochs"] = min(get_preset(PRESET)["warmup_epochs"], args.epochs / 2)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    # The non-local variants are the slowest: start them first, so no worker idles at the end.
    order = sorted(variants, key=lambda v: v not in ("nl_relnet", "gnl_relnet"))
    jobs = [(model, seed) for seed in range(args.seeds) for model in order]
    runs, t0 = [], time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # fresh workers: no OpenMP state forked from this process
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        costs_pending = {m: pool.submit(model_costs, m) for m in variants}
        pending = {pool.submit(train_one, m, s, dict(overrides)): (m, s) for m, s in jobs}
        for done in as_completed(pending):
            run = done.result()
            runs.append(run)
            elapsed = time.perf_counter() - t0
            eta = elapsed / len(runs) * (len(jobs) - len(runs))
            print(f"[{len(runs)}/{len(jobs)}] {run['model']} seed {run['seed']}: held-out top-1 {run['top1']:.3f}, "
                  f"train loss {run['train_loss']:.3f}, {run['wall_s']:.0f} s   (elapsed {elapsed / 60:.1f} min, "
                  f"about {math.ceil(eta / 60)} min left)", flush=True)
        costs = {m: f.result() for m, f in costs_pending.items()}
    wall = time.perf_counter() - t0

    rows = summarise(runs, costs, variants)
    cfg = get_preset(PRESET) | {k: v for k, v in overrides.items() if k in ("epochs", "warmup_epochs")}
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, {args.jobs} worker processes x 1 thread, "
               f"torch {__import__('torch').__version__}")
    result = {"machine": machine, "wall_s": wall, "preset": cfg, "train_size": overrides["train_size"],
              "holdout": overrides["holdout"], "seeds": args.seeds, "rows": rows, "runs": runs}
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=1) + "\n").encode())
    table = format_table(rows)
    atomic_write_bytes(out / "table.md", (table + "\n").encode())
    title = (f"same-different, {overrides['train_size']} training images, {cfg['epochs']} epochs, "
             f"{args.seeds} seed{'s' if args.seeds > 1 else ''}; chance = 0.5")
    plot(rows, runs, out / "relational.png", title)
    print()
    print(table)
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min on {machine}.")
    print(f"Wrote {out}/results.json, {out}/table.md and {out}/relational.png.")
    print("Next: compare with docs/models.md, 'The relational experiment'.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
