"""``python -m benchmarks.report``: rerun every benchmark behind the project's claims and write docs/benchmarks.md
with its plots. About 20 minutes on 2 CPU cores; run it on a quiet machine (the page says how busy it was).

Sections, each a module that also runs alone (``python -m benchmarks.<module>``):

* ``scaling``  -- the paper's claim: GA, SE, SGE, CBAM, NL and GNL blocks and their networks, time and peak memory
  as the input grows 32 -> 320; where NL costs 2x and 10x GA (benchmarks/scaling.py);
* ``table1``   -- every Table 1 row and ShuffleNetV1 +- GA: params, MACs, latency at batch 1 and 32 in PyTorch
  eager, ONNX Runtime fp32 (standard and fused), INT8, and CUDA where present (benchmarks/table1.py);
* ``serving``  -- ganet-serve, the naive ONNX Runtime and PyTorch servers and LitServe 0.2 at 1 -> 64 concurrent
  clients, CPU time per image (benchmarks/serve_sweep.py);
* ``training`` -- ganet-train against a bare loop, and the projected wall-clock of each paper recipe
  (benchmarks/train_recipes.py).

The raw results go to benchmarks/results/report/ (not in git); ``--render FILE`` redraws the page from one.
``--config tiny`` runs every section in seconds (the test suite's end-to-end check), never for the docs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("scaling", "table1", "serving", "training")
IMAGES = {"scaling_time": "bench_scaling_time.png", "scaling_ratio": "bench_scaling_ratio.png",
          "scaling_memory": "bench_scaling_memory.png", "table1_latency": "bench_table1_latency.png",
          "serving": "bench_serving.png", "training": "bench_training.png"}
SECTION_IMAGES = {"scaling": ("scaling_time", "scaling_ratio", "scaling_memory"), "table1": ("table1_latency",),
                  "serving": ("serving",), "training": ("training",)}


@dataclass(frozen=True)
class ReportConfig:
    """What each section measures (the full configuration's values are the defaults)."""

    scaling_sizes: tuple[int, ...] = (32, 64, 128, 224, 320)
    scaling_block_rounds: int = 21
    scaling_network_rounds: int = 9
    scaling_threads: int = 1  # see benchmarks/scaling.py: barriers stall on a shared machine
    table1_forms: tuple[str, ...] = ("cifar", "imagenet")
    table1_rows: tuple[str, ...] = ("shufflenet_v2", "se_shufflenet_v2", "cbam_shufflenet_v2", "sge_shufflenet_v2",
                                    "nl_shufflenet_v2", "gnl_shufflenet_v2", "ga_shufflenet_v2", "shufflenet_v1",
                                    "ga_shufflenet_v1")
    table1_batches: tuple[int, ...] = (1, 32)
    table1_rounds: int = 5
    table1_budget_s: float | None = 75.0  # per form and batch size: batch 32 gets fewer rounds (GNL in eager
                                          # PyTorch alone takes 10 s a call at the CIFAR form's batch 32)
    table1_runtimes: tuple[str, ...] = ("torch", "ort", "ort_fused", "int8", "cuda")
    serve_levels: tuple[int, ...] = (1, 4, 16, 64)
    serve_rounds: int = 2
    serve_duration_s: float = 4.0
    serve_warmup_s: float = 1.5
    serve_servers: tuple[str, ...] = ("ours", "ort", "torch", "litserve")
    train_rounds: int = 3
    train_steps: int = 4
    train_recipe_steps: int = 3
    train_imagenet_batch: int = 16
    train_batch: int = 64  # the loop comparison's and the 32x32 recipes' CPU batch
    table1_export: bool = True  # False: only graphs already in --exports run, the rest in PyTorch alone


CONFIGS = {
    "full": ReportConfig(),
    "tiny": ReportConfig(scaling_sizes=(32, 64), scaling_block_rounds=2, scaling_network_rounds=1,
                         table1_forms=("cifar",), table1_rows=("shufflenet_v2", "ga_shufflenet_v2"),
                         table1_batches=(1, 2), table1_rounds=1, serve_levels=(1, 2), serve_rounds=1,
                         serve_duration_s=1.0, serve_warmup_s=0.3, serve_servers=("ours", "ort", "litserve"),
                         table1_export=False, train_rounds=1, train_steps=1, train_recipe_steps=1,
                         train_imagenet_batch=2, train_batch=8),
}


def log(message: str) -> None:
    print(message, flush=True)


def run_section(name: str, cfg: ReportConfig, threads: int, workdir: Path, serve_export: Path | None,
                exports: Path | None) -> dict:
    if name == "scaling":
        from benchmarks import scaling

        return scaling.run(cfg.scaling_sizes, cfg.scaling_block_rounds, cfg.scaling_network_rounds,
                           cfg.scaling_threads, log=log)
    if name == "table1":
        from benchmarks import table1

        return table1.run(list(cfg.table1_forms), list(cfg.table1_rows), list(cfg.table1_batches), cfg.table1_rounds,
                          cfg.table1_runtimes, threads, exports or workdir / "table1", log=log,
                          export=cfg.table1_export, budget_s=cfg.table1_budget_s)
    if name == "serving":
        from benchmarks import serve_sweep

        log("Serving:")
        return serve_sweep.run(cfg.serve_levels, cfg.serve_rounds, cfg.serve_duration_s, cfg.serve_warmup_s,
                               cfg.serve_servers, workdir, log=log, export=serve_export)
    from benchmarks import train_recipes

    return train_recipes.run(cfg.train_rounds, cfg.train_steps, cfg.train_recipe_steps, cfg.train_imagenet_batch,
                             threads, log=log, batch=cfg.train_batch)


def render(report: dict, docs: Path) -> Path:
    """The page and the figures of the sections ``report`` holds."""
    from benchmarks import report_page, report_plots

    images: dict[str, Path] = {}
    draw = {"scaling_time": report_plots.scaling_time, "scaling_ratio": report_plots.scaling_ratio,
            "scaling_memory": report_plots.scaling_memory, "table1_latency": report_plots.table1_latency,
            "serving": report_plots.serving, "training": report_plots.training}
    for section, keys in SECTION_IMAGES.items():
        if section not in report:
            continue
        for key in keys:
            if key == "scaling_memory" and "peak_memory" not in report["scaling"]:
                continue
            images[key] = draw[key](report[section], docs / "images" / IMAGES[key])
    return report_page.write_page(report, docs, images)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", choices=sorted(CONFIGS), default="full", help="full (the docs) or tiny (a test)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all four")
    p.add_argument("--docs", type=Path, default=ROOT / "docs",
                   help="where benchmarks.md and images/bench_*.png go (default: docs/)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "report",
                   help="folder for the raw JSON (default: benchmarks/results/report/, ignored by git)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch and ONNX Runtime threads for Table 1 and training (default: the usable CPUs)")
    p.add_argument("--serve-export", type=Path, help="serve this ganet-export directory instead of exporting one")
    p.add_argument("--exports", type=Path, help="keep (and reuse) Table 1's exports in this folder, "
                                                "DIR/<form>/<model>/model.onnx, ... (default: a temporary folder)")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only redraw the page from a run's JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.report: the plots need matplotlib: pip install 'ganet[plots]'", file=sys.stderr)
        return 2
    if args.render:
        page = render(json.loads(args.render.read_text()), args.docs)
        print(f"wrote {page} from {args.render}")
        return 0

    from benchmarks.machine import BusyMeter, describe
    from ganet._io import atomic_write_bytes
    from ganet.system import usable_cpus

    cfg = CONFIGS[args.config]
    threads = args.threads or usable_cpus()
    busy = BusyMeter()
    started = time.perf_counter()
    report: dict = {"machine": describe(), "config_name": args.config, "config": asdict(cfg), "threads": threads,
                    "command": shlex.join(["python", "-m", "benchmarks.report", *(argv or sys.argv[1:])]),
                    "section_s": {}}
    log(f"{report['machine']['cpu_model']}, {report['machine']['cpus_usable']} cores; sections: "
        f"{', '.join(args.sections)} ({args.config})")
    with tempfile.TemporaryDirectory(prefix="ganet-report.") as tmp:
        for name in args.sections:
            t0 = time.perf_counter()
            report[name] = run_section(name, cfg, threads, Path(tmp), args.serve_export, args.exports)
            report["section_s"][name] = time.perf_counter() - t0
            log(f"{name}: {report['section_s'][name]:.0f} s")
    report["wall_s"] = time.perf_counter() - started
    report["busy"] = busy.summary()
    report["finished"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = args.results / f"report_{stamp}.json"
    try:
        report["results_path"] = str(results.relative_to(ROOT))
    except ValueError:
        report["results_path"] = str(results)
    atomic_write_bytes(results, (json.dumps(report, indent=2) + "\n").encode())
    page = render(report, args.docs)
    log(f"\nwrote {page} and its figures in {args.docs / 'images'}; raw results {results}")
    log(f"{report['wall_s'] / 60:.1f} minutes in all; other processes used "
        f"{100 * report['busy']['others_share_of_machine']:.0f}% of the machine meanwhile. "
        f"Next: read {page}, or redraw it with --render {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
