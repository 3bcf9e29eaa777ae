"""``ganet-visualize``: what a trained model's attention blocks do on one image, drawn from its real forward pass.

Group Attention models: the image beside each group's unary mask (eq. 1), pooling mask (eq. 3) and assigning mask
(eq. 5), for one unit of every stage -- the "implicit group clustering" the GANet paper's Figure 1 argues for,
drawn for GA itself. Non-local (NL, GNL) models: the pixel-pair attention of a few query pixels, as in Figure 1.

The maps are the ones the blocks compute in the pass: each block hands them to a hook
(``ganet.layers._mask_hooks``); nothing here re-implements an equation.

Grid (every panel is PANEL_IN inches square, at DPI dots per inch):

* GA: ``3 x stages`` rows (per stage: unary, pooling, assigning) and ``1 + G`` columns (the network's input image,
  then groups 1..G). Unary and assigning masks are sigmoids, drawn on a fixed 0..1 scale; a pooling mask is a
  softmax over H x W (it sums to 1), drawn from its own minimum to its maximum.
* NL / GNL: one row per attention group (1 for NL, G for GNL) and ``1 + queries`` columns (the image with the
  query pixels marked, then each query's map, a softmax over H x W, from its minimum to its maximum).
"""
from __future__ import annotations

import argparse
import io
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PANEL_IN = 0.9  # inches per panel
LABEL_IN = 1.3  # left margin for the row labels
TITLE_IN = 0.75  # top margin for the title (up to three lines) and the column titles
DPI = 100
GA_ROWS = (("unary", "unary (eq. 1)"), ("pool", "pooling (eq. 3)"), ("assign", "assigning (eq. 5)"))
QUERY_COLOURS = ("#00e5ff", "#ff4081", "#76ff03", "#ffea00", "#d500f9", "#ff9100")


@dataclass
class BlockMaps:
    """One attention block's maps from one forward pass (batch item 0), as numpy arrays."""

    name: str  # module path, e.g. "stage2.3.attn"
    kind: str  # "ga" or "nonlocal"
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # GA: (G, H, W) each; "attention": (G, H, W, H, W)


@dataclass
class Drawing:
    figure: Any  # matplotlib.figure.Figure
    rows: int
    cols: int
    blocks: list[BlockMaps]  # the blocks drawn, in row order

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


class VisualizeError(ValueError):
    """A request ganet-visualize cannot draw; the message says what was expected."""


def capture_maps(model: Any, x: Any) -> list[BlockMaps]:
    """Run ``model`` on ``x`` (1, 3, S, S) once; the maps every attention block handed to its hook, in model order."""
    import torch

    from ganet.layers import GroupAttention
    from ganet.layers._mask_hooks import MaskHooks

    captured: dict[str, dict[str, np.ndarray]] = {}

    def keep(name: str):
        def hook(_block: Any, maps: dict[str, torch.Tensor]) -> None:  # copies: the block reuses its buffers
            captured[name] = {k: v[0].float().cpu().numpy().copy() for k, v in maps.items()}
        return hook

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MaskHooks)]
    handles = [m.register_mask_hook(keep(name)) for name, m in blocks]
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return [BlockMaps(name, "ga" if isinstance(m, GroupAttention) else "nonlocal", captured[name])
            for name, m in blocks if name in captured]


def pick_units(blocks: list[BlockMaps], unit: str) -> list[BlockMaps]:
    """One GA block per stage (the first path component, e.g. ``stage3``): its ``first``, ``last`` or N-th (1-based)."""
    stages: dict[str, list[BlockMaps]] = {}
    for b in blocks:
        stages.setdefault(b.name.split(".")[0], []).append(b)
    chosen = []
    for stage, members in stages.items():
        if unit in ("first", "last"):
            chosen.append(members[0] if unit == "first" else members[-1])
            continue
        index = int(unit)
        if not 1 <= index <= len(members):
            raise VisualizeError(f"--unit {unit}: {stage} has units 1..{len(members)} with Group Attention")
        chosen.append(members[index - 1])
    return chosen


def _figure(rows: int, cols: int, title: str) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure

    width, height = LABEL_IN + cols * PANEL_IN, TITLE_IN + rows * PANEL_IN
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=LABEL_IN / width, right=1 - 0.02 / width, bottom=0.02 / height,
                        top=1 - TITLE_IN / height, wspace=0.06, hspace=0.12)
    fig.suptitle(textwrap.fill(title, int(width * 13)), fontsize=8, y=1 - 0.05 / height, va="top")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _interpolation(image: np.ndarray) -> str:
    return "nearest" if image.shape[0] < 2 * PANEL_IN * DPI else "antialiased"  # small inputs: show their pixels


def _label(ax: Any, text: str) -> None:
    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=7, labelpad=4)


def draw_ga(image: np.ndarray, blocks: list[BlockMaps], title: str) -> Drawing:
    """Rows: for each block (one per stage), its unary, pooling and assigning masks; columns: image, groups 1..G."""
    kinds = [(key, label) for key, label in GA_ROWS if key in blocks[0].maps]
    groups = blocks[0].maps[kinds[0][0]].shape[0]
    rows, cols = len(kinds) * len(blocks), 1 + groups
    fig, axes = _figure(rows, cols, title)
    extent = (0, image.shape[1], image.shape[0], 0)  # masks stretched over the image, whatever their resolution
    for i, block in enumerate(blocks):
        for j, (key, label) in enumerate(kinds):
            row = axes[i * len(kinds) + j]
            masks = block.maps[key]  # (G, H, W)
            row[0].imshow(image, extent=extent, interpolation=_interpolation(image))
            _label(row[0], f"{block.name.removesuffix('.attn')}\n{label}\n{masks.shape[1]}x{masks.shape[2]}")
            for g in range(groups):
                m = masks[g]
                scale = (m.min(), m.max()) if key == "pool" else (0.0, 1.0)  # softmax: its own range; sigmoid: 0..1
                row[1 + g].imshow(m, cmap="magma" if key == "pool" else "viridis", vmin=scale[0], vmax=scale[1],
                                  interpolation="nearest", extent=extent)
    axes[0][0].set_title("image", fontsize=7)
    for g in range(groups):
        axes[0][1 + g].set_title(f"group {g + 1}", fontsize=7)
    return Drawing(fig, rows, cols, blocks)


def draw_attention(image: np.ndarray, block: BlockMaps, queries: list[tuple[int, int]], title: str) -> Drawing:
    """Rows: attention groups (1 for NL, G for GNL); columns: image with the queries marked, then each query's map."""
    attention = block.maps["attention"]  # (G, h, w, h, w): [g, y, x] is query (x, y)'s map
    heads, fh, fw = attention.shape[:3]
    size = image.shape[0]
    rows, cols = heads, 1 + len(queries)
    fig, axes = _figure(rows, cols, title)
    extent = (0, image.shape[1], image.shape[0], 0)
    for g in range(heads):
        axes[g][0].imshow(image, extent=extent, interpolation=_interpolation(image))
        _label(axes[g][0], f"{block.name.removesuffix('.attn')}\ngroup {g + 1} of {heads}\n{fh}x{fw}")
        for q, (x, y) in enumerate(queries):
            colour = QUERY_COLOURS[q % len(QUERY_COLOURS)]
            fy, fx = y * fh // size, x * fw // size  # the feature pixel the query falls in
            m = attention[g, fy, fx]
            ax = axes[g][1 + q]
            ax.imshow(m, cmap="magma", vmin=m.min(), vmax=m.max(), interpolation="nearest", extent=extent)
            for a in (axes[g][0], ax):
                a.plot([x + 0.5], [y + 0.5], marker="x", color=colour, markersize=6, markeredgewidth=1.5)
    axes[0][0].set_title("image", fontsize=7)
    for q, (x, y) in enumerate(queries):
        axes[0][1 + q].set_title(f"query ({x}, {y})", fontsize=7, color="black")
    return Drawing(fig, rows, cols, [block])


def default_queries(size: int) -> list[tuple[int, int]]:
    """The center and two points on the diagonal, a quarter of the way in from each corner."""
    return [(size // 2, size // 2), (size // 4, size // 4), (3 * size // 4, 3 * size // 4)]


def parse_query(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two integers, pixels of the network input), got {text!r}")
    return x, y


def visualize(checkpoint: str | Path, image_path: str | Path, unit: str = "last",
              queries: list[tuple[int, int]] | None = None) -> Drawing:
    """The drawing for ``checkpoint`` on ``image_path`` (see the module docstring for the grid)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ganet.checkpoint import load_checkpoint
    from ganet.preprocess import image_to_uint8, normalize

    model, info = load_checkpoint(checkpoint)
    prep = info.preprocessing
    try:
        with Image.open(image_path) as img:
            pixels = image_to_uint8(img, prep)  # (3, S, S): what serving and export parity feed the network
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise VisualizeError(f"{image_path}: not an image this can read ({e})") from None
    x = normalize(torch.from_numpy(pixels).float().div(255), prep).unsqueeze(0)  # (1, 3, S, S)
    blocks = capture_maps(model, x)
    image = pixels.transpose(1, 2, 0)  # (S, S, 3)
    ga = [b for b in blocks if b.kind == "ga"]
    if ga:
        chosen = pick_units(ga, unit)
        title = (f"{info.model}: Group Attention masks on {Path(image_path).name} ({prep.input_size}x"
                 f"{prep.input_size} input; {unit} GA unit of each stage). Unary, assigning: 0 (dark) to 1 (yellow); "
                 f"pooling: each map from its min (black) to its max (white)")
        return draw_ga(image, chosen, title)
    nonlocal_blocks = [b for b in blocks if b.kind == "nonlocal"]
    if not nonlocal_blocks:
        raise VisualizeError(f"{checkpoint}: model {info.model!r} has no Group Attention or non-local block to draw")
    queries = queries or default_queries(prep.input_size)
    for x_q, y_q in queries:
        if not (0 <= x_q < prep.input_size and 0 <= y_q < prep.input_size):
            raise VisualizeError(f"--query {x_q},{y_q} is outside the {prep.input_size}x{prep.input_size} network "
                                 f"input (0..{prep.input_size - 1})")
    block = nonlocal_blocks[0]
    title = (f"{info.model}: pixel-pair attention of {block.name} on {Path(image_path).name}; each map from "
             f"its min (black) to its max (white)")
    return draw_attention(image, block, queries, title)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ganet-visualize",
        description="Draw what a checkpoint's attention blocks compute on one image, from the real forward pass. "
                    "Group Attention models: each group's unary (eq. 1), pooling (eq. 3) and assigning (eq. 5) "
                    "masks for one unit per stage, beside the image: rows are stage x mask, columns the image "
                    "then groups 1..G. Non-local (NL, GNL) models: the pixel-pair attention map of a few query "
                    "pixels, as in the GANet paper's Figure 1: one row per attention group, columns the image then "
                    "one map per query. The image goes through the checkpoint's own preprocessing (resize, center "
                    "crop), the same as serving; the first column shows that network input.",
        epilog="example: ganet-visualize runs/demo/best.safetensors digit.png -o ga_masks.png",
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint (ganet-train's best.safetensors)")
    p.add_argument("image", type=Path, help="an image file (JPEG, PNG, ...)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="PNG to write (default: IMAGE's name + '.attention.png' in the current folder)")
    p.add_argument("--unit", default="last", help="GA models: which unit of each stage to draw: first, last "
                                                  "(default) or its 1-based index")
    p.add_argument("--query", type=parse_query, action="append", metavar="X,Y",
                   help="NL/GNL models: a query pixel, in pixels of the network input (0,0 top left); repeatable "
                        "(default: the center and the points a quarter of the way in from two opposite corners)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unit not in ("first", "last") and not args.unit.isdigit():
        parser.error(f"--unit must be first, last or a unit number, got {args.unit!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("ganet-visualize: needs matplotlib: pip install 'ganet[plots]'", file=sys.stderr)
        return 2
    from ganet._io import atomic_write_bytes
    from ganet.checkpoint import CheckpointError

    output = args.output or Path(f"{args.image.stem}.attention.png")
    try:
        drawing = visualize(args.checkpoint, args.image, args.unit, args.query)
    except (CheckpointError, VisualizeError) as e:
        print(f"ganet-visualize: error: {e}", file=sys.stderr)
        return 2
    atomic_write_bytes(output, drawing.png())
    what = ("GA masks, rows stage x (unary, pooling, assigning), columns image + groups"
            if drawing.blocks[0].kind == "ga" else "pixel-pair attention, rows attention groups, columns image + "
                                                   "queries")
    print(f"wrote {output}: {drawing.rows} x {drawing.cols} panels ({what}). docs/models.md says how to read it.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
