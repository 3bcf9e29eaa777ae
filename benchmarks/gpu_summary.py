"""The closing table of benchmarks/gpu_checks.sh: every target against what the results folder holds.

    python benchmarks/gpu_summary.py RESULTS_DIR      # reads model.json, decode.json, serve_decode_*.json and
                                                      # figures.jsonl there; writes RESULTS_DIR/summary.json

Targets (224x224 ga_shufflenet_v2, one H100/H200): model only, fp16/bf16 + CUDA graphs >= 20,000 images/s at batch
256; end to end over HTTP >= 3,000 images/s (aim 5,000) with 64 to 256 clients; p99 <= 3x p50 at half the peak;
CUDA graph replay within 1e-4 of eager fp32 (relative to the logits' scale); fp16 top-1 >= 99.5% of fp32's
(bf16 >= 98%);
GPU decoding top-1 >= 99.5% of Pillow decoding's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ganet._io import atomic_write_bytes  # noqa: E402


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(folder: Path) -> list[dict]:
    rows: list[dict] = []

    def check(name: str, value, target: str, ok: bool | None) -> None:
        rows.append({"check": name, "value": value, "target": target,
                     "result": "missing" if value is None else ("ok" if ok else "MISSED") if ok is not None else "-"})

    model = load(folder / "model.json")
    best = None
    if model and model["config"]["device"].startswith("cuda"):
        cands = [r for r in model["results"] if r["mode"] == "graph" and r["batch"] == 256
                 and r["precision"] in ("fp16", "bf16")]
        best = max((r["images_per_s"]["median"] for r in cands), default=None)
    check("model only, fp16/bf16 + CUDA graphs, batch 256 (images/s)", best and round(best), ">= 20000",
          best is not None and best >= 20_000)
    if model:
        for r in model["results"]:
            if r["batch"] == 256 and r["precision"] == "fp32":
                rows.append({"check": f"  (model only, fp32 {r['mode']}, batch 256)",
                             "value": round(r["images_per_s"]["median"]), "target": "", "result": "-"})
    for decode in ("cpu", "gpu"):
        serve = load(folder / f"serve_decode_{decode}.json")
        ours = (serve or {}).get("servers", {}).get("ours", {})
        ips = ours.get("images_per_s")
        gpu_util = (ours.get("gpu_utilization_pct") or {}).get("median")
        check(f"end to end, --decode {decode} (images/s at the best client count {ours.get('clients')}; GPU "
              f"{gpu_util if gpu_util is None else round(gpu_util)}%, server CPU "
              f"{round(ours['server_cpu_ms_per_image'], 2) if ips else None} ms/image)",
              ips and round(ips), ">= 3000 (aim 5000)", ips is not None and ips >= 3000)
        ratio = (serve or {}).get("ratios", {}).get("p99_over_p50_at_half_peak")
        check(f"  p99 / p50 at half the peak, --decode {decode}", ratio and round(ratio, 2), "<= 3",
              ratio is not None and ratio <= 3)
    figures = {}
    try:
        for line in (folder / "figures.jsonl").read_text().splitlines():
            item = json.loads(line)
            figures[item.pop("name")] = item
    except OSError:
        pass
    g = figures.get("graph_vs_eager_fp32")
    check("CUDA graph vs eager fp32, max |d logit| / logit scale", g and g["relative"], "<= 1e-4",
          g is not None and g["relative"] <= 1e-4)
    for precision, bound in (("fp16", 0.995), ("bf16", 0.98)):  # bf16: 7 mantissa bits (tests/test_serve_gpu_graphs.py)
        f = figures.get(f"top1_{precision}_vs_fp32")
        check(f"{precision} vs fp32 top-1 agreement ({f and f['images']} images)", f and f["top1_agreement"],
              f">= {bound}", f is not None and f["top1_agreement"] >= bound)
    f = figures.get("decode_top1_cuda")
    check(f"GPU decode vs Pillow top-1 agreement ({f and f['images']} images)", f and f["top1_agreement"], ">= 0.995",
          f is not None and f["top1_agreement"] >= 0.995)
    f = figures.get("decode_uint8_cuda")
    check("GPU decode vs Pillow, uint8 input: max / mean |d|", f and f"{f['max_abs_uint8']} / {f['mean_abs_uint8']:.3f}",
          "stated", None)
    atomic_write_bytes(folder / "summary.json", (json.dumps({"checks": rows, "figures": figures}, indent=2) + "\n")
                       .encode())
    width = max(len(r["check"]) for r in rows)
    for r in rows:
        print(f"{r['check']:<{width}}  {str(r['value']):>14}  {r['target']:<20} {r['result']}")
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1]))
