"""The long form of ganet-serve's reliability suite: the scenarios of tests/test_serve_reliability.py at full size,
against a real ganet-serve on 127.0.0.1, written up as JSON and Markdown.

Targets: 0 x 5xx over >= 10,000 fuzzed requests and schemathesis (every check) on 3 seeds; peak RSS under the
worst crafted input <= baseline + the decode budget, and back within 10% of the baseline after; no normal request
past its deadline during an adversarial flood; a tampered model never answers.

    python benchmarks/reliability.py                                   # GA-ShuffleNetV2 224x224, exported here
    python benchmarks/reliability.py --export exports/digits --fuzz 2000 --seeds 1 --flood-s 5   # a quick pass

The export (random weights: nothing here depends on them) is built with ganet-export unless --export is given.
Writes benchmarks/results/reliability_<date>.json and .md. Run it under `flock /tmp/ganet-heavy.lock` on a shared
host: it takes a few minutes of both cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the scenarios and generators are the test suite's

import reliability_scenarios as rs  # noqa: E402

from ganet._io import atomic_write_bytes  # noqa: E402


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def make_export(root: Path, model: str, size: int) -> Path:
    """A real export of ``model`` (random weights, 10 classes) at ``size`` x ``size``."""
    from ganet.checkpoint import save_checkpoint
    from ganet.models import create_model
    from ganet.preprocess import Preprocessing

    ckpt = save_checkpoint(root / "model.safetensors", create_model(model, num_classes=10).eval(), model,
                           [f"class{i}" for i in range(10)], Preprocessing.for_input_size(size))
    subprocess.run(["ganet-export", str(ckpt), "--output", str(root / "export"), "--max-batch", "16",
                    "--benchmark-rounds", "0"], check=True, capture_output=True, timeout=1800)
    return root / "export"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--export", type=Path, help="export directory to serve (default: export ga_shufflenet_v2 here)")
    p.add_argument("--model", default="ga_shufflenet_v2", help="architecture to export without --export")
    p.add_argument("--size", type=int, default=224, help="input size of that export")
    p.add_argument("--fuzz", type=int, default=10_000, help="fuzzed images (plus a tenth again as v2 BYTES)")
    p.add_argument("--seeds", type=int, default=3, help="schemathesis seeds (each run twice: with and without the "
                                                        "served model's name)")
    p.add_argument("--examples", type=int, default=50, help="schemathesis examples per operation and phase")
    p.add_argument("--flood-s", type=float, default=15, help="seconds of the flood at twice capacity")
    p.add_argument("--adversarial-s", type=float, default=30, help="seconds of the adversarial flood")
    p.add_argument("--deadline-ms", type=int, default=3000, help="the server's --timeout-ms")
    p.add_argument("--budget-mib", type=int, default=1024, help="the server's --max-decode-bytes, in MiB")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results", help="where the report goes")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ganet-reliability-"))
    started = time.monotonic()
    if args.export is None:
        print(f"[reliability] exporting {args.model} at {args.size}x{args.size} ...", flush=True)
        args.export = make_export(work, args.model, args.size)
    manifest = json.loads((args.export / "manifest.json").read_text())
    size, max_files = manifest["preprocessing"]["input_size"], 64
    budget = args.budget_mib * 2**20
    deadline_s = args.deadline_ms / 1e3
    server_args = ("--timeout-ms", str(args.deadline_ms), "--max-decode-bytes", str(budget), "--max-pixels",
                   "60000000", "--header-timeout-s", "5", "--keep-alive-s", "5", "--max-files", str(max_files))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
                    "export": str(args.export), "model": manifest["model"], "input_size": size,
                    "server_args": list(server_args), "rlimit_nofile": 512}

    def step(name: str) -> None:
        print(f"[reliability] {name} ({time.monotonic() - started:.0f} s)", flush=True)

    server = rs.start_server(args.export, *server_args, nofile=512, log_dir=work)
    try:
        log = server.log_text()
        integrity = json.loads(next(line for line in log.splitlines() if '"event": "integrity"' in line))
        report["integrity_at_start"] = integrity
        step("schemathesis")
        report["schemathesis"] = [rs.schemathesis(server.url, seed, args.examples, named, work, max_time_s=900)
                                  for seed in range(1, args.seeds + 1) for named in (False, True)]
        step(f"fuzzing {args.fuzz} images")
        report["fuzz"] = rs.fuzz(server, args.fuzz, seed=0)
        step("crafted bombs")
        report["crafted"] = rs.crafted(server, budget, repeat=2)
        step("v2 loop stalls")
        report["stall"] = {"empty_bytes_20mb": rs.stall_probe(server, *rs.hostile.v2_empty_elements(19 * 2**20)),
                           "json_64_images": rs.stall_probe(server, *rs.hostile.v2_json_pixels(max_files, size))}
        step("capacity and flood")
        cap = rs.capacity(server, seconds=8)
        report["capacity"] = cap
        report["flood"] = rs.flood(server, 2 * cap["images_per_s"], args.flood_s, deadline_s)
        step("adversarial flood")
        report["adversarial"] = rs.adversarial(server, args.adversarial_s, deadline_s,
                                               normal_rate=max(2.0, cap["images_per_s"] / 4), max_files=max_files,
                                               input_size=size)
        step("slow and idle clients")
        report["slow_and_idle"] = rs.slow_and_idle(server, idle=1000, header_timeout_s=5)
        report["server_log_tracebacks"] = server.log_text().count("Traceback")
    finally:
        server.stop()
    step("flood with a 300 ms deadline")
    short = rs.start_server(args.export, *server_args, "--timeout-ms", "300", nofile=512, log_dir=work)
    try:
        report["flood_300ms"] = rs.flood(short, 2 * report["capacity"]["images_per_s"], args.flood_s, 0.3)
    finally:
        short.stop()
    step("SIGTERM under load")
    report["sigterm"] = rs.sigterm_under_load(args.export, 64, 10.0, *server_args)
    step("start-up integrity")
    report["integrity_cases"] = rs.integrity_cases(args.export, work)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["targets"] = targets(report, budget)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"reliability_{datetime.date.today():%Y%m%d}"
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(report, indent=2).encode())
    atomic_write_bytes(stem.with_suffix(".md"), markdown(report).encode())
    print(markdown(report))
    print(f"[reliability] wrote {stem}.json and .md; the targets: "
          f"{'all met' if all(t['met'] for t in report['targets'].values()) else 'NOT all met'}")
    return 0 if all(t["met"] for t in report["targets"].values()) else 1


def targets(r: dict, budget: int) -> dict:
    fuzz_5xx = r["fuzz"]["fivexx"]
    schema_ok = all(s["returncode"] == 0 for s in r["schemathesis"])
    crafted = r["crafted"]
    return {
        "no_5xx": {"met": fuzz_5xx == 0 and schema_ok and crafted["fivexx"] == 0 and r["adversarial"]["fivexx"] == 0
                   and r["fuzz"]["requests"] >= 10_000,
                   "value": f"{fuzz_5xx} x 5xx over {r['fuzz']['requests']} fuzzed requests; schemathesis "
                            f"{sum(s['returncode'] == 0 for s in r['schemathesis'])}/{len(r['schemathesis'])} runs "
                            "clean"},
        "rss_bounded": {"met": crafted["peak_concurrent_over_baseline_mb"] <= budget / 2**20
                        and crafted["after_over_baseline_mb"] <= 0.1 * crafted["baseline_mb"],
                        "value": f"peak +{crafted['peak_concurrent_over_baseline_mb']} MiB over a "
                                 f"{crafted['baseline_mb']} MiB baseline (budget {budget / 2**20:.0f} MiB), "
                                 f"+{crafted['after_over_baseline_mb']} MiB after"},
        "normal_within_deadline": {"met": r["adversarial"]["normal_past_deadline"] == 0,
                                   "value": f"{r['adversarial']['normal_past_deadline']} normal requests past the "
                                            f"deadline; normal p99 {r['adversarial']['normal']['p99_ms']} ms"},
        "tampered_never_answers": {"met": all(c["ok"] for c in r["integrity_cases"]),
                                   "value": f"{sum(c['ok'] for c in r['integrity_cases'])}/"
                                            f"{len(r['integrity_cases'])} start-up cases exit 2 with one line"},
    }


def markdown(r: dict) -> str:
    lines = [f"# ganet-serve reliability, {r['date']}", "",
             f"{r['model']} at {r['input_size']}x{r['input_size']}, `{' '.join(r['server_args'])}`, "
             f"RLIMIT_NOFILE {r['rlimit_nofile']}; {r['cpu']}; {r['seconds']} s in all.", "",
             "| target | met | measured |", "|---|---|---|"]
    for name, t in r["targets"].items():
        lines.append(f"| {name} | {'yes' if t['met'] else '**no**'} | {t['value']} |")
    lines += ["", "## Schemathesis (every check)", "", "| seed | model name | result | cases |", "|---|---|---|---|"]
    for s in r["schemathesis"]:
        lines.append(f"| {s['seed']} | {s['model_name']} | {s['summary']} | {s['test_cases']} |")
    f = r["fuzz"]
    lines += ["", "## Fuzzed images", "", f"{f['requests']} requests: {f['outcome']['statuses']}; RSS "
              f"{f['rss_before_mb']:.0f} -> peak {f['rss_peak_mb']:.0f} -> {f['rss_after_mb']:.0f} MiB.", "",
              "## Crafted inputs (one at a time, then all at once twice)", "",
              "| case | bytes | status | code | ms | peak over baseline MiB | after MiB |", "|---|---|---|---|---|---|---|"]
    for c in r["crafted"]["cases"]:
        lines.append(f"| {c['case']} | {c['bytes']:,} | {c['status']} | {c['code'] or ''} | {c['ms']} | "
                     f"{c['peak_over_baseline_mb']} | {c['after_over_baseline_mb']} |")
    cr = r["crafted"]
    lines += ["", f"All at once: {cr['concurrent']['statuses']}, peak +{cr['peak_concurrent_over_baseline_mb']} MiB, "
              f"after +{cr['after_over_baseline_mb']} MiB over {cr['baseline_mb']} MiB.", "",
              "## Load", "",
              f"* capacity (8 closed-loop clients, a 640x427 JPEG): {r['capacity']['images_per_s']} images/s",
              f"* flood at {r['flood']['rate']:.0f}/s for {r['flood']['seconds']} s: {r['flood']['outcome']}; images "
              f"inferred for requests already answered: {r['flood']['inferred_for_answered']} of "
              f"{r['flood']['images_inferred']}",
              f"* the same with --timeout-ms 300: {r['flood_300ms']['outcome']['statuses']}; inferred for answered "
              f"requests: {r['flood_300ms']['inferred_for_answered']} of {r['flood_300ms']['images_inferred']}",
              f"* adversarial flood ({r['adversarial']['seconds']} s): normal {r['adversarial']['normal']}; "
              f"adversaries {r['adversarial']['adversaries']['statuses']}; mid-body disconnects "
              f"{r['adversarial']['disconnects_sent']}",
              f"* /v2/health/live while a worst-case v2 body is handled: {r['stall']}",
              f"* idle and slow clients: {r['slow_and_idle']}",
              f"* SIGTERM under load: {r['sigterm']}", "", "## Start-up integrity", "",
              "| case | exit | lines | message |", "|---|---|---|---|"]
    for c in r["integrity_cases"]:
        lines.append(f"| {c['case']} | {c['returncode']} | {c['lines']} | {c['message'][:160]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
