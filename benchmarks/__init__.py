"""The benchmark scripts, and the report that reruns them all (``python -m benchmarks.report``).

Each script also runs on its own (``python benchmarks/bench_serve.py``), where Python puts this folder on the
path and the scripts import their sibling ``_stats`` as a top-level module. Imported as ``benchmarks.X`` (by the
report, or ``python -m benchmarks.X``) they need the same, so the package appends this folder to the path.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
