"""``report.md``: the manifest's parity and speed results as tables a person reads. Torch-free."""
from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render_report(m: dict[str, Any]) -> str:
    lines = [f"# Export report: {m['model']}", ""]
    inp, onnx = m["input"], m["onnx"]
    lines += [
        f"- checkpoint: `{m['checkpoint']['path']}` (sha256 `{m['checkpoint']['sha256'][:16]}...`)",
        f"- input `{inp['name']}`: {inp['dtype']} {inp['shape']} {inp['layout']} {inp['color']} 0..255, from "
        "`ganet.preprocess.image_to_uint8`; the graph normalises",
        f"- output `{m['output']['name']}`: float32 {m['output']['shape']}; labels in `labels.txt`",
        f"- ONNX: opset {onnx['opset']}, IR {onnx['ir_version']}, torch.onnx.export(dynamo={onnx['dynamo']}), "
        f"exported at batch {onnx['export_batch']}, simplified: {onnx['simplified'] or 'no'}, TensorRT op check: "
        f"{onnx.get('tensorrt_op_check') or 'not run'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "- artifacts: " + ", ".join(f"`{a['file']}` ({a['precision']})" for a in m["artifacts"]),
        "",
        "## Parity against PyTorch fp32 (CPU)",
        "",
        f"{m['parity']['inputs']['count']} real images ({'photographs + ' + m['parity']['inputs']['dataset_heldout'] + ' held-out split' if m['parity']['inputs']['dataset_heldout'] else 'photographs'}), "
        "each artifact run at every batch size below.",
        "",
        "| artifact | batch | max abs dlogit | mean abs dlogit | top-1 agreement | tolerance | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("onnx_before_simplify", "onnx", "onnx_fused", "tensorrt"):
        r = m["parity"].get(kind)
        if not r:
            continue
        tol = r["tolerance"]
        tol_text = f"<= {_g(tol['max_abs'])}, top-1 >= {_pct(tol['top1_agreement'])}"
        for b, rb in r["by_batch"].items():
            lines.append(f"| {kind} | {b} | {_g(rb['max_abs'])} | {_g(rb['mean_abs'])} | {_pct(rb['top1_agreement'])} "
                         f"| {tol_text} | {'pass' if r['passed'] else 'FAIL'} |")
    worst = m["parity"]["onnx"]["worst"]
    lines += ["", "Largest ONNX Runtime fp32 differences: " + ", ".join(f"{w['input']} ({_g(w['max_abs'])})"
                                                                      for w in worst) + "."]
    int8 = m["parity"].get("onnx_int8")
    if int8:
        vs = int8["vs_torch"]
        lines += ["", "## INT8 (ONNX Runtime static quantization, QDQ)", ""]
        held = int8.get("heldout")
        if held:
            lines += [f"Held-out top-1 on {held['images']} {held['dataset']} images: fp32 {_pct(held['top1_fp32'])}, "
                      f"int8 {_pct(held['top1_int8'])}, drop {held['drop_points']:.2f} points (limit "
                      f"{held['max_drop_points']:.0f})."]
        else:
            lines += ["Not gated: the checkpoint's data set was not reachable on the exporting host, so INT8 was "
                      "calibrated on the photographs and no held-out accuracy was measured."]
        lines += [f"Against PyTorch fp32 on the parity images: max abs dlogit {_g(vs['max_abs'])}, top-1 agreement "
                  f"{_pct(vs['top1_agreement'])}."]
    speed = m.get("speed")
    if speed:
        lines += ["", f"## CPU latency ({speed['device']}, median of {speed['rounds']} interleaved rounds)", "",
                  "| batch | runner | median ms | speed-up vs PyTorch eager (median, min..max) |", "|---|---|---|---|"]
        for b, runners in speed["by_batch"].items():
            for name, r in runners.items():
                lines.append(f"| {b} | {name} | {r['median_ms']:.2f} | {r['speedup_median']:.2f}x "
                             f"({r['speedup_min']:.2f}..{r['speedup_max']:.2f}) |")
        lines += ["", "Timings come from the exporting host, which may be shared; compare ratios within one run."]
    trt = next((a for a in m["artifacts"] if a["kind"] == "tensorrt"), None)
    if trt:
        e = {k: v for k, v in trt.items() if k not in ("kind", "file")}
        lines += ["", "## TensorRT engine", "", "Tied to this GPU architecture and TensorRT version: "
                  + ", ".join(f"{k} {v}" for k, v in e.items()) + ". Rebuild with `ganet-export --trt` elsewhere."]
    if m.get("triton"):
        t = m["triton"]
        lines += ["", "## Triton", "", f"Model repository `{t['repository']}/` (model `{t['model_name']}`, platform "
                  f"`{t['platform']}`): `tritonserver --model-repository {t['repository']}`."]
    lines += ["", "Verify this directory at any time: `ganet-export --verify DIR`. Serve it: `ganet-serve DIR`.", ""]
    return "\n".join(lines)
