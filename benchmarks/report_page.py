"""docs/benchmarks.md from the report's raw JSON: the machine, the headline numbers, then one section per benchmark
with its figure and tables. Every number printed here is read from the JSON of one run."""
from __future__ import annotations

import os
from pathlib import Path

from ganet._io import atomic_write_bytes

RUNTIME_NAMES = {"torch": "PyTorch eager", "ort": "ORT fp32", "ort_fused": "ORT fp32 fused", "int8": "ORT INT8",
                 "cuda": "PyTorch CUDA"}
BLOCK_ORDER = ("ga", "se", "sge", "cbam", "nl", "gnl")
SERVER_NAMES = {"ours": "ganet-serve", "ort": "naive ONNX Runtime", "torch": "naive PyTorch", "litserve": "LitServe"}


def _x(s: dict | None, f: str = ".2f") -> str:
    """A spread as ``median (min-max)``."""
    if not s:
        return "–"
    return f"{s['median']:{f}} ({s['min']:{f}}–{s['max']:{f}})"


def _ms(v: float | None) -> str:
    return "–" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def crossover_words(c: dict, what: str, level: str) -> str:
    if c["status"] == "below":
        return f"{what} costs {level}x GA already at the smallest input measured ({c['size']} px)"
    if c["status"] == "measured":
        return (f"{what} costs {level}x GA from an input of about **{c['size']} px** (a {c['feature']}x{c['feature']} "
                f"feature map; interpolated between the measured {c['between'][0]} and {c['between'][1]})")
    words = f"{what} stays below {level}x GA up to the largest input measured (at most {c['max_ratio']:.2f}x, at {c['at']} px)"
    if c.get("extrapolated_size"):
        words += (f"; carrying the last two sizes' trend on, it would reach {level}x near {c['extrapolated_size']} px "
                  "(an extrapolation, not a measurement)")
    return words


def machine_lines(r: dict) -> list[str]:
    m, busy = r["machine"], r["busy"]
    gpu = m["gpu"] or "none"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"* **CPU**: {m['cpu_model']} (`lscpu`), {m['cpus_usable']} cores used of {m['cpus_online']} online"
        f"{', ' + m['hypervisor'] + ' virtual machine' if m.get('hypervisor') else ''}; AVX-512 VNNI: "
        f"{'yes' if m['avx512_vnni'] else 'no'}; AVX2: {'yes' if m['avx2'] else 'no'}. **GPU**: {gpu}.",
        f"* **Software**: Python {m['python']}, {versions}.",
        f"* **While it ran**: other processes used {busy['others_cpu_s']:.0f} CPU-seconds, "
        f"{100 * busy['others_share_of_machine']:.0f}% of the machine's capacity over the run (from /proc/stat, "
        f"minus this run's own processes); load average {busy['loadavg_start'][0]:.2f} at the start, "
        f"{busy['loadavg_end'][0]:.2f} at the end.",
        f"* **Run**: `{r['command']}`, configuration `{r['config_name']}`, {r['threads']} threads for PyTorch and "
        f"ONNX Runtime, {r['wall_s'] / 60:.1f} minutes in all ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in r["section_s"].items()) + " minutes), finished "
        f"{r['finished']}.",
    ]


def headline(r: dict) -> list[str]:
    out = []
    if "scaling" in r:
        c = r["scaling"]["crossover"]["block"]
        out.append(f"* **Scaling**: {crossover_words(c['2'], 'one NL block', '2')}; "
                   f"{crossover_words(c['10'], 'it', '10')}.")
    if "serving" in r and "ratios" in r["serving"]:
        s = r["serving"]
        level = "16" if "16" in s["ratios"].get("ort", {}) else str(s["levels"][-1])
        parts = [f"{_x(s['ratios'][b][level])}x {SERVER_NAMES[b]}" for b in ("ort", "torch", "litserve")
                 if b in s["ratios"]]
        out.append(f"* **Serving** at {level} clients: ganet-serve does " + ", ".join(parts)
                   + " (images/s, median (min–max) over rounds; target ≥ 1.4x the naive ONNX Runtime server).")
    if "table1" in r:
        t = r["table1"]
        for form in t["forms"]:
            batch = max(t["forms"][form]["latency"], key=int)  # the form's largest batch
            row = t["forms"][form]["latency"][batch].get("ga_shufflenet_v2", {})
            cost = {rt: row[rt]["over_baseline"] for rt in ("torch", "ort", "ort_fused") if "over_baseline" in
                    row.get(rt, {})}
            if cost:
                out.append(f"* **GA-ShuffleNetV2 over ShuffleNetV2**, {form} form, batch {batch}: "
                           + ", ".join(f"{RUNTIME_NAMES[k]} {_x(v)}x" for k, v in cost.items()) + ".")
    if "training" in r:
        loop = r["training"]["loop"]
        out.append(f"* **Training**: ganet-train runs at {_x(loop['ratio_ganet_over_bare'], '.3f')}x a bare loop's "
                   f"images/s (target ≥ 0.95).")
    return out


def scaling_section(s: dict, images: dict[str, str]) -> list[str]:
    sizes = s["sizes"]
    c = s["crossover"]
    lines = ["## The scaling claim: pairwise attention at unary cost", "",
             "The paper's central claim is that GA reaches pairwise attention while its cost grows like a unary "
             "block's, O(HW·C), where non-local attention grows as O((HW)²·C). Measured here as the input grows: "
             f"each block where the non-local models put theirs (stage 2 of the ImageNet form: "
             f"{s['stage2_channels']} channels at 1/{s['stage2_stride']} of the input, so "
             f"{sizes[0] // s['stage2_stride']}x{sizes[0] // s['stage2_stride']} to "
             f"{sizes[-1] // s['stage2_stride']}x{sizes[-1] // s['stage2_stride']}), and the whole ImageNet-form "
             f"networks, batch {s['batch']}, PyTorch eager on {s['threads']} thread{'s' if s['threads'] > 1 else ''} "
             "(on a shared machine a multi-threaded PyTorch stalls at its barriers whenever another process holds "
             f"a core, which would swamp these milliseconds), {s['block_rounds']} (blocks) and "
             f"{s['network_rounds']} (networks) interleaved rounds per size; time is the median with min–max bars.",
             "",
             f"![time against input size]({images['scaling_time']})", "",
             f"* {crossover_words(c['block']['2'], 'One NL block', '2')}.",
             f"* {crossover_words(c['block']['10'], 'One NL block', '10')}.",
             f"* Whole networks: {crossover_words(c['network']['2'], 'the NL network (one NL block)', '2')}: the "
             "network's convolutions dominate, and NL-ShuffleNetV2 has one pairwise block where GA-ShuffleNetV2 "
             "has sixteen GA blocks.", "",
             f"![NL over GA]({images['scaling_ratio']})", "",
             "| input | feature map | GA ms | SE | SGE | CBAM | NL | GNL | NL / GA time | NL / GA MACs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        t = s["block_time"][str(size)]
        f = size // s["stage2_stride"]
        macs = s["block_macs"]["nl"][str(size)] / s["block_macs"]["ga"][str(size)]
        lines.append(f"| {size} | {f}x{f} | {_ms(t['ga']['median_ms'])} | "
                     + " | ".join(_ms(t[n]['median_ms']) for n in ("se", "sge", "cbam", "nl", "gnl"))
                     + f" | {_x(t['nl']['over_ga'])} | {macs:.1f} |")
    lines += ["", "Whole networks (ms per image, batch 1; ratio to the plain network at the same widths, per round):",
              "", "| input | plain | GA | SE | SGE | CBAM | NL | GNL | GA / plain | NL / GA |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        t = s["network_time"][str(size)]
        lines.append(f"| {size} | " + " | ".join(_ms(t[n]['median_ms']) for n in
                                                  ("plain", "ga", "se", "sge", "cbam", "nl", "gnl"))
                     + f" | {_x(t['ga']['over_plain'])} | {_x(t['nl']['over_ga'])} |")
    if "peak_memory" in s:
        mem = s["peak_memory"]
        b, n = mem["block"], mem["network"]
        last = str(sizes[-1])
        mib = lambda v: f"{v / 2 ** 20:.2f}" if v < 10 * 2 ** 20 else f"{v / 2 ** 20:.0f}"  # noqa: E731
        lines += ["", f"![peak memory]({images['scaling_memory']})", "",
                  f"Peak memory is the resident memory one forward pass adds at its peak ({mem['method']}; glibc "
                  "returns every freed buffer of 64 KiB or more to the kernel, so earlier passes cannot hide it; "
                  "`tracemalloc` would see none of torch's allocations). At the largest input one NL block adds "
                  f"{mib(b['nl'][last])} MiB and one GNL block {mib(b['gnl'][last])} MiB, against "
                  f"{mib(b['ga'][last])} MiB for GA: PyTorch's `scaled_dot_product_attention`, which both call, "
                  "holds the (HW)x(HW) weights here (per group, for GNL).",
                  "", "| input | " + " | ".join(f"{x} block MiB" for x in ("GA", "SE", "SGE", "CBAM", "NL", "GNL"))
                  + " | plain network MiB | GA network MiB | NL network MiB | GNL network MiB |",
                  "|---" * 11 + "|"]
        for size in sizes:
            lines.append(f"| {size} | " + " | ".join(mib(b[x][str(size)]) for x in BLOCK_ORDER) + " | "
                         + " | ".join(mib(n[x][str(size)]) for x in ("plain", "ga", "nl", "gnl")) + " |")
    return lines + [""]


def _rounds_said(t: dict) -> str:
    """The rounds run, naming each form and batch size that the time budget held to fewer."""
    fewer = []
    for form, data in t["forms"].items():
        for batch, rows in data["latency"].items():
            got = min(e["rounds"] for runtimes in rows.values() for e in runtimes.values())
            if got < t["rounds"]:
                fewer.append(f"{got} for the {form} form's batch {batch}")
    said = str(t["rounds"])
    return f"{said} ({', '.join(fewer)}, which the time budget held to fewer)" if fewer else said


def table1_section(t: dict, images: dict[str, str]) -> list[str]:
    lines = ["## Table 1, measured", "",
             "Every row of the paper's Table 1 and ShuffleNetV1 with and without GA: parameters and MACs counted "
             "by `ganet-profile`'s counter beside the paper's columns (its top-1 is the paper's; training on "
             "CIFAR-100 or ImageNet is out of this machine's reach), and latency in every runtime a user deploys, "
             f"batch {' and '.join(map(str, t['batches']))}, {_rounds_said(t)} interleaved rounds (every model "
             "and runtime of a form in turn). Weights are random: speed does not depend on them. Each model is "
             "exported as `ganet-export` does it; the fused graph exists for GA models only. \"x plain\" is the "
             "per-round ratio to the plain backbone of the same table in the same runtime (ShuffleNetV2 or "
             "ShuffleNetV1; for the fused graph, the plain model's standard graph, which is what a GA model "
             f"replaces): median (min–max). {t['threads']} threads for PyTorch and ONNX Runtime.", "",
             f"![latency over the plain backbone]({images['table1_latency']})", ""]
    runtimes = [r for r in ("torch", "ort", "ort_fused", "int8", "cuda") if r in t["runtimes"]]
    for form, data in t["forms"].items():
        size = data["input_size"]
        lines += [f"### {form.capitalize()} form ({size}x{size}, {100 if form == 'cifar' else 1000} classes)", "",
                  "| model | params | paper | MMACs | paper | paper top-1 |", "|---|---|---|---|---|---|"]
        for row, p in data["profile"].items():
            paper_p = f"{p['paper_params_m']:.2f}M" if p["paper_params_m"] else "–"
            paper_m = f"{p['paper_macs_m']:.2f}" if p["paper_macs_m"] else "–"
            top1 = f"{p['paper_top1']:.2f}%" if p["paper_top1"] else "–"
            lines.append(f"| {p['model']} | {p['params'] / 1e6:.3f}M | {paper_p} | {p['macs'] / 1e6:.2f} | "
                         f"{paper_m} | {top1} |")
        for batch, by_row in data["latency"].items():
            present = [rt for rt in runtimes if any(rt in e for e in by_row.values())]
            lines += ["", f"Latency, batch {batch} (ms per batch, median):", "",
                      "| model | " + " | ".join(RUNTIME_NAMES[rt] for rt in present)
                      + " | " + " | ".join(f"{RUNTIME_NAMES[rt]} x plain" for rt in present) + " |",
                      "|---" * (1 + 2 * len(present)) + "|"]
            for row, entries in by_row.items():
                ms = " | ".join(_ms(entries[rt]["median_ms"]) if rt in entries else "–" for rt in present)
                ratio = " | ".join(_x(entries[rt].get("over_baseline")) if rt in entries else "–" for rt in present)
                lines.append(f"| {data['profile'][row]['model']} | {ms} | {ratio} |")
            ga = by_row.get("ga_shufflenet_v2", {})
            speed = [f"{RUNTIME_NAMES[rt]} {_x(ga[rt]['speedup_vs_torch'])}x" for rt in present
                     if "speedup_vs_torch" in ga.get(rt, {})]
            if speed:
                lines += ["", f"GA-ShuffleNetV2 against PyTorch eager, per round: " + ", ".join(speed)
                          + " (target ≥ 2x for ORT fp32)."]
        lines.append("")
    return lines


def serving_section(s: dict, images: dict[str, str]) -> list[str]:
    levels = s["levels"]
    servers = [n for n in ("ours", "ort", "torch", "litserve") if str(levels[0]) in s["servers"].get(n, {})]
    lines = ["## Serving", "",
             f"{s['model']}; each request POSTs {s['image']} to `/classify`; closed loop (each client sends its "
             f"next request when the last is answered) at {', '.join(map(str, levels))} concurrent keep-alive "
             f"clients, {s['duration_s']:g} s measured after {s['warmup_s']:g} s of warm-up per window, "
             f"{s['rounds']} rounds, every level of every server in turn. The servers: `ganet-serve` with its "
             "defaults (ONNX Runtime on `model.fused.onnx`, dynamic batching); the naive FastAPI servers of "
             "`benchmarks/naive_server.py` (decode + a batch of 1 per request in FastAPI's threadpool, library "
             "defaults) on `model.onnx` and on PyTorch eager; LitServe with its own dynamic batching on "
             "`model.onnx` (`benchmarks/litserve_server.py`: one worker per core with one ONNX Runtime thread, "
             "batches of up to 4 gathered for up to 2 ms, as ganet-serve runs on this CPU).", ""]
    if s.get("skipped"):
        lines += [f"Not run: " + "; ".join(f"{SERVER_NAMES[k]}: {v}" for k, v in s["skipped"].items()), ""]
    if not all(s.get("same_answers", {}).values()):
        lines += [f"**Warning**: the servers did not all answer the same top-5: {s.get('same_answers')}", ""]
    lines += [f"![serving]({images['serving']})", "",
              "| clients | " + " | ".join(f"{SERVER_NAMES[n]} img/s" for n in servers)
              + " | " + " | ".join(f"{SERVER_NAMES[n]} p50 / p99 ms" for n in servers) + " |",
              "|---" * (1 + 2 * len(servers)) + "|"]
    for c in levels:
        e = {n: s["servers"][n][str(c)] for n in servers}
        lines.append(f"| {c} | " + " | ".join(_x(e[n]["images_per_s_rounds"], ".1f") for n in servers) + " | "
                     + " | ".join(f"{_ms(e[n]['latency_ms']['p50'])} / {_ms(e[n]['latency_ms']['p99'])}"
                                  for n in servers) + " |")
    if "ratios" in s:
        lines += ["", "ganet-serve's throughput over each baseline, per (level, round): median (min–max):", "",
                  "| clients | " + " | ".join(f"over {SERVER_NAMES[b]}" for b in s["ratios"]) + " |",
                  "|---" * (1 + len(s["ratios"])) + "|"]
        for c in levels:
            lines.append(f"| {c} | " + " | ".join(_x(s["ratios"][b][str(c)]) for b in s["ratios"]) + " |")
    level = str(max(levels))
    ours = s["servers"].get("ours", {}).get(level, {})
    split = ours.get("cpu_split")
    if split:
        cpu = split["cpu_ms"]
        total = sum(cpu.values())
        lines += ["", f"CPU time per image at {level} clients ({split['cpu_source']}; mean batch "
                  f"{split['mean_batch_size']:.1f}): ganet-serve "
                  + ", ".join(f"{part} {cpu[part]:.2f} ms ({cpu[part] / total:.0%})" for part in cpu)
                  + f", {split['process_cpu_ms']:.2f} ms in all; "
                  + ", ".join(f"{SERVER_NAMES[n]} {s['servers'][n][level]['server_cpu_ms_per_image']:.2f} ms"
                              for n in servers if n != "ours")
                  + " (whole process tree)."]
    return lines + [""]


def training_section(t: dict, images: dict[str, str]) -> list[str]:
    loop = t["loop"]
    ips = loop["images_per_s"]
    lines = ["## Training", "",
             f"`ganet-train`'s loop against the 15-line loop anyone would write, same model "
             f"(`{loop['model']}`), batch {loop['batch_size']}, {loop['input_size']}x{loop['input_size']}, "
             f"{loop['steps']} steps per loop and round, {loop['rounds']} alternating rounds "
             "(`benchmarks/bench_train_throughput.py`):", "",
             "| loop | images/s, median (min–max) | ratio to the bare loop, per round |", "|---|---|---|",
             f"| bare loop | {_x(ips['bare'], '.1f')} | |",
             f"| ganet-train | {_x(ips['ganet'], '.1f')} | {_x(loop['ratio_ganet_over_bare'], '.3f')} |",
             f"| ganet-train + shift/flip augmentation | {_x(ips['ganet_augmented'], '.1f')} | "
             f"{_x(loop['ratio_ganet_augmented_over_bare'], '.3f')} |", "",
             "The paper's recipes (`ganet-train --preset NAME`), projected from rates measured in this run: on this "
             "CPU, epochs x training images / ganet-train's images per second (compute only); on one H100, on paper "
             "(`benchmarks/estimate_cifar100_gpu.py`'s model: the largest of compute at 15% of the bf16 peak, "
             "activation traffic and kernel launches per step; a measured H100 took 3-4x the eager estimate, see "
             "[training.md](training.md)).", "",
             f"![training recipes]({images['training']})", "",
             "| preset | model | epochs x images | this CPU, img/s | this CPU, hours | H100 on paper, eager | H100 on "
             "paper, CUDA graphs |" + (" measured GPU fp32 |" if any("gpu_measured" in r for r in
                                                                 t["recipes"].values()) else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if any("gpu_measured" in r for r in t["recipes"].values())
                                                else "")]
    for name, r in t["recipes"].items():
        g = r["gpu_on_paper"]
        row = (f"| `{name}` | {r['model']} ({r['input_size']}x{r['input_size']}, batch {r['batch_size']}) | "
               f"{r['epochs']} x {r['train_images']:,} | {r['cpu']['images_per_s']:.1f} | "
               f"{r['cpu']['recipe_hours']:,.0f} | {g['recipe_minutes_eager']:,.0f} min | "
               f"{g['recipe_minutes_compiled']:,.0f} min |")
        if "gpu_measured" in r:
            row += f" {r['gpu_measured']['fp32']['recipe_minutes']:,.0f} min |"
        lines.append(row)
    return lines + [""]


def write_page(report: dict, docs: Path, images: dict[str, Path]) -> Path:
    """docs/benchmarks.md (or ``docs``/benchmarks.md); image links relative to it."""
    page = docs / "benchmarks.md"
    rel = {k: os.path.relpath(v, docs) for k, v in images.items()}
    lines = ["# Benchmarks: the paper's claims and the project's targets, measured", "",
             f"Written by `python -m benchmarks.report` from one run; do not edit by hand, rerun it. Every figure "
             "is measured side by side in that run: runners interleaved round by round, ratios taken per round "
             "and reported as median (min–max). The raw numbers are in "
             f"`{report['results_path']}` (not in git).", "", "## Machine", "", *machine_lines(report), "",
             "## Headline", "", *headline(report), ""]
    for key, section in (("scaling", scaling_section), ("table1", table1_section), ("serving", serving_section),
                         ("training", training_section)):
        if key in report:
            lines += section(report[key], rel)
    lines += ["## Rerunning", "",
              "```bash", "pip install -e \".[dev]\"          # matplotlib, LitServe 0.2 and py-spy come with [bench]",
              "python -m benchmarks.report       # about 20 minutes on 2 cores; --help for the sections and sizes",
              "```", "",
              "Each section also runs alone and writes its JSON: `python -m benchmarks.table1`, `python -m "
              "benchmarks.scaling`, `python -m benchmarks.serve_sweep`, `python -m benchmarks.train_recipes`. "
              "`python -m benchmarks.report --render RESULTS.json` redraws this page from a run's JSON.", ""]
    atomic_write_bytes(page, "\n".join(lines).encode())
    return page
