"""The benchmark report end to end in its tiny configuration: every section runs for real (blocks and networks
timed and their memory measured in a worker process, the exported model in ONNX Runtime standard, fused and INT8,
ganet-serve, the naive server and LitServe as real processes, ganet-train's loop), and the page and its plots are
written with what they should hold. The tiny configuration reuses the serving tests' export (one per session)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import export_dir  # noqa: F401  (a session fixture: the real export)

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))


@pytest.mark.slow
def test_tiny_report_writes_the_page_and_its_plots(tmp_path, export_dir):  # noqa: F811
    exports = tmp_path / "exports" / "cifar"
    exports.mkdir(parents=True)
    (exports / "ga_shufflenet_v2_cifar").symlink_to(export_dir)  # Table 1 runs its ONNX graphs, exports nothing
    docs, results = tmp_path / "docs", tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--config", "tiny", "--docs", str(docs), "--results", str(results),
         "--serve-export", str(export_dir), "--exports", str(tmp_path / "exports")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"wrote {docs / 'benchmarks.md'}" in result.stdout

    page = (docs / "benchmarks.md").read_text()
    raw = json.loads(next(results.glob("report_*.json")).read_text())
    # the machine, named as lscpu names it, with VNNI as the kernel reports it
    vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    assert f"**CPU**: {cpu_model()} (`lscpu`)" in page and f"AVX-512 VNNI: {'yes' if vnni else 'no'}" in page
    for heading in ("## Headline", "## The scaling claim", "## Table 1, measured", "## Serving", "## Training"):
        assert heading in page
    # every plot the page links exists, is small and is not blank
    links = re.findall(r"!\[[^]]*]\(([^)]+)\)", page)
    assert len(links) == 6
    for link in links:
        png = docs / link
        assert png.is_file() and png.stat().st_size < 200_000, link
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.std() > 10 and (pixels < 128).mean() > 0.01, f"{link} looks blank"
    # the numbers on the page are the run's
    scaling = raw["scaling"]
    assert scaling["sizes"] == [32, 64] and set(scaling["crossover"]["block"]) == {"2", "10"}
    assert re.search(r"one NL block (costs|stays below) 2x GA", page)
    nl_over_ga = scaling["block_time"]["64"]["nl"]["over_ga"]
    assert f"| 64 | 8x8 | " in page and f"{nl_over_ga['median']:.2f} ({nl_over_ga['min']:.2f}–" in page
    assert scaling["peak_memory"]["block"]["nl"]["64"] > 0 and scaling["peak_memory"]["network"]["ga"]["64"] > 0
    table = raw["table1"]["forms"]["cifar"]
    ga = table["latency"]["2"]["ga_shufflenet_v2"]
    assert {"torch", "ort", "ort_fused", "int8"} <= set(ga)  # the reused export ran in every ONNX Runtime form
    assert table["profile"]["ga_shufflenet_v2"]["params"] == 1_464_628  # ganet-profile's count (100 classes)
    assert "| ga_shufflenet_v2_cifar | 1.465M | 1.48M | 194.51 | 194.14 | 78.40% |" in page
    serving = raw["serving"]
    assert set(serving["servers"]) == {"ours", "ort", "litserve"} and all(serving["same_answers"].values())
    for name in ("ours", "ort", "litserve"):
        assert serving["servers"][name]["2"]["images_per_s"] > 0
    assert "| 2 | " in page and "LitServe img/s" in page and "CPU time per image at 2 clients" in page
    training = raw["training"]
    assert set(training["recipes"]) == {"cifar100", "nl-finetune", "imagenet"}
    assert "`imagenet` | ga_shufflenet_v2 (224x224, batch 512) | 100 x 1,281,167" in page

    # the page is a function of the JSON: --render gives it back byte for byte
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "benchmarks.report", "--render", str(next(results.glob("report_*.json"))),
                    "--docs", str(again)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert (again / "benchmarks.md").read_text() == page
