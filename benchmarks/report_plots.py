"""The report's figures, drawn from its raw JSON (matplotlib, ``pip install 'ganet[plots]'``). Each function writes
one PNG and returns its path; every measured point is a median with its spread (min..max of the rounds) as bars."""
from __future__ import annotations

import io
from pathlib import Path

from ganet._io import atomic_write_bytes

DPI = 100
COLOURS = {"ga": "#d62728", "nl": "#1f77b4", "gnl": "#17becf", "se": "#2ca02c", "sge": "#bcbd22", "cbam": "#9467bd",
           "plain": "#7f7f7f",
           "ours": "#d62728", "ort": "#1f77b4", "torch": "#ff7f0e", "litserve": "#2ca02c",
           "torch_rt": "#ff7f0e", "ort_rt": "#1f77b4", "ort_fused": "#d62728", "int8": "#2ca02c", "cuda": "#9467bd"}
NAMES = {"ga": "GA", "nl": "NL", "gnl": "GNL", "se": "SE", "sge": "SGE", "cbam": "CBAM", "plain": "plain"}


def _figure(width: float, height: float, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _plain_log_ticks(ax) -> None:
    """Log axes labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            _plain_log_ticks(ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return atomic_write_bytes(path, buffer.getvalue())


def _errorbar(ax, xs, entries, key: str, **style):
    """Median line with min..max bars; ``entries[i][key]`` is a ``_stats.spread`` dict."""
    med = [e[key]["median"] for e in entries]
    lo = [e[key]["median"] - e[key]["min"] for e in entries]
    hi = [e[key]["max"] - e[key]["median"] for e in entries]
    ax.errorbar(xs, med, yerr=[lo, hi], capsize=2, linewidth=1.5, markersize=4, **style)


def _log_size_axes(ax, sizes: list[int], ylabel: str, title: str) -> None:
    """Log-log axes over the input sizes measured, ticks at those sizes."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("input size (pixels per side)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def scaling_time(scaling: dict, path: Path) -> Path:
    """The headline: block and network time against the input size, log-log."""
    sizes = scaling["sizes"]
    fig, (ax_b, ax_n) = _figure(10, 4.2, cols=2)
    for ax, key, names, title in ((ax_b, "block_time", ("nl", "gnl", "cbam", "sge", "se", "ga"),
                                   f"one block at stage 2 ({scaling['stage2_channels']} channels, 1/"
                                   f"{scaling['stage2_stride']} of the input)"),
                                  (ax_n, "network_time", ("nl", "gnl", "cbam", "sge", "se", "ga", "plain"),
                                   "whole ShuffleNetV2 (ImageNet form)")):
        for name in names:
            entries = [scaling[key][str(s)][name] for s in sizes]
            _errorbar(ax, sizes, entries, "ms", marker="o", color=COLOURS[name], label=NAMES[name],
                      linestyle="--" if name == "plain" else "-")
        _log_size_axes(ax, sizes, "ms per forward pass, batch 1", title)
        ax.grid(True, which="major", alpha=0.3)
    # slope guides on the block panel: time proportional to HW and to (HW)^2, through GA's and NL's last points
    last = str(sizes[-1])
    for name, power, style in (("ga", 2, ":"), ("nl", 4, "-.")):
        y_last = scaling["block_time"][last][name]["ms"]["median"]
        guide = [y_last * (s / sizes[-1]) ** power for s in sizes]
        ax_b.plot(sizes, guide, style, color="black", linewidth=0.8, alpha=0.6,
                  label="∝ HW" if power == 2 else "∝ (HW)²")
    ax_b.legend(fontsize=8, ncol=2)
    ax_n.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def scaling_ratio(scaling: dict, path: Path) -> Path:
    """NL and GNL over GA, measured time (median, min..max of the rounds) and MACs, with the 2x and 10x lines."""
    sizes = scaling["sizes"]
    fig, (ax,) = _figure(6.5, 4.2)
    for name in ("nl", "gnl"):
        entries = [scaling["block_time"][str(s)][name] for s in sizes]
        _errorbar(ax, sizes, entries, "over_ga", marker="o", color=COLOURS[name], label=f"{NAMES[name]} / GA, time")
        macs = [scaling["block_macs"][name][str(s)] / scaling["block_macs"]["ga"][str(s)] for s in sizes]
        ax.plot(sizes, macs, "--", color=COLOURS[name], alpha=0.7, label=f"{NAMES[name]} / GA, MACs")
    net = [scaling["network_time"][str(s)]["nl"] for s in sizes]
    _errorbar(ax, sizes, net, "over_ga", marker="s", color="#555555", label="NL network / GA network, time")
    for level in (2, 10):
        ax.axhline(level, color="black", linewidth=0.8, linestyle=":")
        ax.text(sizes[0], level * 1.05, f"{level}x", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("input size (pixels per side)")
    ax.set_ylabel("cost relative to Group Attention")
    ax.set_title("pairwise attention over GA, one block at stage 2 and whole networks", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scaling_memory(scaling: dict, path: Path) -> Path:
    sizes = scaling["sizes"]
    memory = scaling["peak_memory"]
    fig, (ax_b, ax_n) = _figure(10, 4.0, cols=2)
    for ax, kind, names in ((ax_b, "block", ("nl", "gnl", "cbam", "sge", "se", "ga")),
                            (ax_n, "network", ("nl", "gnl", "cbam", "sge", "se", "ga", "plain"))):
        for name in names:
            values = [max(memory[kind][name][str(s)], 1) / 2 ** 20 for s in sizes]
            ax.plot(sizes, values, marker="o", color=COLOURS[name], label=NAMES[name],
                    linestyle="--" if name == "plain" else "-")
        _log_size_axes(ax, sizes, "MiB added at the peak of one pass",
                       f"peak memory, {'one block at stage 2' if kind == 'block' else 'whole network'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def table1_latency(table1: dict, path: Path) -> Path:
    """Per row, latency over its plain backbone in each runtime, at the largest batch."""
    forms = list(table1["forms"])
    runtimes = [r for r in ("torch", "ort", "ort_fused", "int8", "cuda") if r in table1["runtimes"]]
    fig, axes = _figure(5.2 * len(forms), 4.0, cols=len(forms))
    for ax, form in zip(axes, forms):
        batch = max(table1["forms"][form]["latency"], key=int)  # the form's largest batch
        by_row = table1["forms"][form]["latency"][batch]
        rows = [r for r in table1["rows"] if any("over_baseline" in e for e in by_row.get(r, {}).values())]
        width = 0.8 / len(runtimes)
        for k, runtime in enumerate(runtimes):
            xs, med, lo, hi = [], [], [], []
            for i, row in enumerate(rows):
                entry = by_row[row].get(runtime, {}).get("over_baseline")
                if entry:
                    xs.append(i + (k - (len(runtimes) - 1) / 2) * width)
                    med.append(entry["median"])
                    lo.append(entry["median"] - entry["min"])
                    hi.append(entry["max"] - entry["median"])
            if xs:
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, color=COLOURS[f"{runtime}_rt" if runtime in
                                                                             ("torch", "ort") else runtime],
                       label={"torch": "PyTorch eager", "ort": "ORT fp32", "ort_fused": "ORT fp32 fused",
                              "int8": "ORT INT8", "cuda": "PyTorch CUDA"}[runtime])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [r.replace("_shufflenet", "").replace("_", " ") for r in rows],
                      rotation=30, ha="right", fontsize=8)
        size = table1["forms"][form]["input_size"]
        ax.set_ylabel("latency / plain backbone, same runtime")
        ax.set_title(f"{form} form ({size}x{size}), batch {batch}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def serving(serve: dict, path: Path) -> Path:
    levels = serve["levels"]
    servers = [s for s in ("ours", "ort", "torch", "litserve") if s in serve["servers"] and str(levels[0]) in
               serve["servers"][s]]
    labels = {"ours": "ganet-serve", "ort": "naive ONNX Runtime", "torch": "naive PyTorch", "litserve": "LitServe"}
    fig, (ax_t, ax_l, ax_c) = _figure(14, 4.0, cols=3)
    for name in servers:
        entries = [serve["servers"][name][str(c)] for c in levels]
        _errorbar(ax_t, levels, entries, "images_per_s_rounds", marker="o", color=COLOURS[name], label=labels[name])
        p50 = [e["latency_ms"]["p50"] for e in entries]
        p99 = [e["latency_ms"]["p99"] for e in entries]
        ax_l.plot(levels, p50, "-o", color=COLOURS[name], markersize=4, label=f"{labels[name]} p50")
        ax_l.plot(levels, p99, ":^", color=COLOURS[name], markersize=4, label=f"{labels[name]} p99")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("images/s")
    ax_t.set_title("throughput (median of rounds, min..max)", fontsize=10)
    ax_t.legend(fontsize=8)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("ms")
    ax_l.set_title("latency p50 (solid) and p99 (dotted)", fontsize=10)
    ax_l.legend(fontsize=6, ncol=2)
    # CPU per image at the busiest common level: ganet-serve split by part, the others as a whole
    level = str(max(levels))
    ours = serve["servers"].get("ours", {}).get(level, {})
    split = ours.get("cpu_split", {}).get("cpu_ms")
    x = 0
    names = []
    if split:
        bottom = 0.0
        for part, colour in (("http", "#fdae61"), ("decode", "#abd9e9"), ("inference", "#d7191c")):
            ax_c.bar(x, split[part], 0.6, bottom=bottom, color=colour, label=part)
            bottom += split[part]
        names.append("ganet-serve")
        x += 1
    for name in servers:
        if name == "ours" and split:
            continue
        value = serve["servers"][name][level].get("server_cpu_ms_per_image")
        ax_c.bar(x, value, 0.6, color=COLOURS[name])
        names.append(labels[name])
        x += 1
    ax_c.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax_c.set_ylabel("server CPU ms per image")
    ax_c.set_title(f"CPU time per image at {level} clients", fontsize=10)
    ax_c.legend(fontsize=8)
    ax_c.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def training(train: dict, path: Path) -> Path:
    recipes = train["recipes"]
    names = list(recipes)
    fig, (ax,) = _figure(7, 3.8)
    bars = [("this CPU (measured rate)", lambda r: r["cpu"]["recipe_hours"], "#7f7f7f"),
            ("one H100, on paper, eager", lambda r: r["gpu_on_paper"]["recipe_minutes_eager"] / 60, "#1f77b4"),
            ("one H100, on paper, CUDA graphs", lambda r: r["gpu_on_paper"]["recipe_minutes_compiled"] / 60,
             "#17becf")]
    if any("gpu_measured" in r for r in recipes.values()):
        bars.append(("this GPU, measured fp32 eager",
                     lambda r: r["gpu_measured"]["fp32"]["recipe_minutes"] / 60 if "gpu_measured" in r else 0,
                     "#d62728"))
    width = 0.8 / len(bars)
    for k, (label, value, colour) in enumerate(bars):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [value(recipes[n]) for n in names], width, color=colour, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [f"--preset {n}\n{recipes[n]['model']}" for n in names], fontsize=8)
    ax.set_ylabel("hours for the whole recipe")
    ax.set_title("the paper's training recipes: projected wall-clock", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
