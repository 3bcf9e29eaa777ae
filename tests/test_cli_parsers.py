"""Every command-line parser outside serve/ takes flags only as written: `--epoch` is an error, not `--epochs`
(argparse's prefix matching turned typos into other flags); and `ganet-export --help` answers at once."""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def parser_calls() -> list[tuple[Path, int, bool]]:
    """Every ``ArgumentParser(...)`` call in the repository's Python outside serve/ and tests/: (file, line, whether
    it passes allow_abbrev=False)."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("serve", "tests") or any(part.startswith(".") for part in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                    == "ArgumentParser":
                off = any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                          for k in node.keywords)
                calls.append((rel, node.lineno, off))
    return calls


def test_every_parser_refuses_abbreviations():
    calls = parser_calls()
    assert len(calls) >= 15  # the five commands, the kernels' builder, benchmarks, docker helpers
    assert [f"{f}:{line}" for f, line, off in calls if not off] == []


@pytest.mark.parametrize("command,argv,flag", [
    ("ganet.train.cli", ["--epoch", "1"], "--epoch"),
    ("ganet.export.cli", ["ckpt.safetensors", "--output", "out", "--int", "--max-b", "4"], "--int"),
    ("ganet.demo", ["--epoch", "1"], "--epoch"),
    ("ganet.profile", ["--model", "ga_*"], "--model"),
])
def test_an_abbreviated_flag_is_an_error(command, argv, flag, capsys):
    import importlib

    main = importlib.import_module(command).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_export_help_is_quick_and_literal():
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ganet.export.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - t0
    text = " ".join(result.stdout.split())  # argparse wraps help to the terminal's width
    assert result.returncode == 0
    assert "100% top-1" in text and "%%" not in text
    assert "--data-dir" in text and "NOT gated" in text
    code = "import sys, ganet.export.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "False", imported.stderr  # the exporter (and torch) load only for real work
    assert elapsed < 10  # a bound for a loaded CI machine; it takes 0.25 s here (3-5 s when it imported torch)
