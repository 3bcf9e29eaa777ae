"""Mutation testing of the code that guards users: mutmut 2 over each module in its own scratch copy of the tree,
each mutant against the fast tests that cover that module; the score and the survivors go to docs/testing.md.

Run it through tools/mutation.sh (which pins mutmut and takes the heavy-job lock). mutmut 2 mutates files in
place, so it never runs in your working tree: each module gets ``.mutation/<module>/tree``, a copy of the tracked
and untracked-but-not-ignored files, where ``ganet.serve``/``ganet.export``/``ganet.train`` are symlinks to
``serve/``/``export/``/``train/`` and ``PYTHONPATH`` points there, so that the copy (not the editable install)
is what the tests import. mutmut's cache (``.mutmut-cache``) stays in each copy: an interrupted run resumes where it
stopped; ``--fresh`` starts over. Scopes are function names, never line numbers, so they survive code moves.
"""
from __future__ import annotations

import argparse
import ast
import filecmp
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
DOC = ROOT / "docs" / "testing.md"
PACKAGE_DIRS = {"serve": "serve", "export": "export", "train": "train"}  # ganet.<name> -> <dir>, as pyproject says
HAND_START = "<!-- hand-written below: explanations of equivalent mutants (tools/mutation.py keeps this part) -->"
HAND_END = "<!-- end of the hand-written part -->"


@dataclass(frozen=True)
class Target:
    path: str  # the module's file, relative to the repository root
    scope: tuple[str, ...] | None  # qualified names of the functions/classes/module constants to mutate; None: all
    tests: tuple[str, ...]  # pytest arguments: the fast tests that cover it
    torch: bool  # the tests need tests/conftest.py (which imports torch); False runs them with --noconftest
    why: str  # what the module guards, for the report


# The one list of what is mutated and which tests judge it.
TARGETS: dict[str, Target] = {
    "app": Target("serve/app.py",
                  ("require_api_key", "ServeState.infer", "deadline_of", "warmup_sizes", "CPU_MAX_BATCH",
                   "load_backends"),
                  ("tests/test_guard_auth.py", "tests/test_guard_limits.py", "tests/test_guard_batching.py"), False,
                  "the API key, overload and deadline answers, the batch cap"),
    "middleware": Target("serve/middleware.py", ("_REQUEST_ID", "_json_response", "ServeMiddleware"),
                         ("tests/test_guard_limits.py", "tests/test_guard_auth.py"), False,
                         "the body-size limit, request ids, the deadline over the body read, disconnects"),
    "batcher": Target("serve/batcher.py", None, ("tests/test_guard_batching.py",), False,
                      "dynamic batching: the cap, the queue bound, deadlines, failures"),
    "routes_v2": Target("serve/routes_v2.py", ("unpack_bytes", "_parse", "_pixels", "_encoded", "_infer"),
                        ("tests/test_guard_v2.py", "tests/test_guard_pixels.py"), False,
                        "decoding of v2 tensors (JSON, binary extension, BYTES), their limits"),
    "parity": Target("export/parity.py", None, ("tests/test_guard_parity.py",), True,
                     "the parity bounds and the gate every export passes"),
    "verify": Target("export/verify.py",
                     ("_close", "_RTOL", "_ATOL", "VerifyResult", "_check_files", "_check_contract",
                      "_compare_numbers", "verify_export"),
                     ("tests/test_guard_verify.py",), False,
                     "--verify's hashes, contract and recorded-number checks (its parity re-run needs a trained "
                     "export: tests/test_export.py, too slow to run per mutant)"),
    "preprocess": Target("ganet/preprocess.py", None,
                         ("tests/test_guard_pixels.py", "tests/test_preprocess_and_cli.py",
                          "tests/test_guard_parity.py::test_torch_reference_normalises_as_the_graph_does",
                          "-k", "not demo and not serve_without_model and not torch_free"), True,
                         "the one preprocessing definition: modes, transparency, resize and crop, normalisation"),
    "checkpoint": Target("ganet/checkpoint.py", None, ("tests/test_checkpoint.py", "-k", "not kill_during_save"), True,
                         "reading untrusted checkpoint files: truncation, foreign files, versions, metadata"),
}
KILLED, SURVIVED, TIMEOUT, SUSPICIOUS, SKIPPED, UNTESTED = ("ok_killed", "bad_survived", "bad_timeout",
                                                            "ok_suspicious", "skipped", "untested")


def runner(target: Target) -> str:
    """The test command for one mutant. mutmut 2 counts only exit status 1 as a kill; a mutant that breaks the
    module's import makes pytest exit 2 (collection error), which is a kill too: any failure becomes 1."""
    # `timeout` bounds the tests even when mutmut's own timeout fires: it kills `sh`, not pytest under it.
    parts = ["timeout", "-k", "5", str(TEST_LIMIT_S), sys.executable, "-m", "pytest", "-x", "-q", "-p",
             "no:cacheprovider"]
    if not target.torch:
        parts.append("--noconftest")
    return "sh -c " + shlex.quote(" ".join(shlex.quote(p) for p in (*parts, *target.tests)) + " || exit 1")


# --- the scratch copy ---------------------------------------------------------------------------------------------

def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file() and not f.startswith(".mutation/"))


def sync_tree(tree: Path) -> None:
    """Make ``tree`` a copy of the project's files (mutmut's cache and config kept), with the package symlinks."""
    files = project_files()
    for rel in files:
        src, dst = ROOT / rel, tree / rel
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    keep = set(files) | {".mutmut-cache", "mutmut_config.py", "mutation_scope.json", ANNOTATION_ONLY}
    for path in sorted(tree.rglob("*"), reverse=True):
        rel = path.relative_to(tree).as_posix()
        linked = any(rel.startswith(f"ganet/{name}") for name in PACKAGE_DIRS)
        if linked or path.is_symlink() or "__pycache__" in rel or rel.startswith(".pytest_cache"):
            continue
        if path.is_file() and rel not in keep:
            path.unlink()
    for name, directory in PACKAGE_DIRS.items():
        link = tree / "ganet" / name
        if not link.is_symlink():
            link.symlink_to(Path("..") / directory)


ANNOTATION_ONLY = "annotation_only.txt"  # in each tree: the mutants skipped as changing a type annotation only

HOOK = '''"""Written by tools/mutation.py: mutate only the target's scope (function names, not line numbers), and skip
mutants that change nothing but a type annotation (recorded in annotation_only.txt)."""
import ast
import json
from pathlib import Path

_SCOPE = json.loads(Path(__file__).with_name("mutation_scope.json").read_text())
_SKIPPED = Path(__file__).with_name("annotation_only.txt")


def _without_annotations(source):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant("annotation")  # the field stays a field; its type text goes
    return ast.dump(tree)


def _annotation_only(context):
    """Under `from __future__ import annotations` annotations are strings nothing here evaluates: a mutant whose
    module is the same once they are blanked is equivalent by construction."""
    from mutmut import Context, mutate

    source = Path(context.filename).read_text()  # not yet mutated
    if "from __future__ import annotations" not in source:
        return False
    mutant = Context(source=source, mutation_id=context.mutation_id, filename=context.filename,
                     config=context.config)
    mutated, performed = mutate(mutant)
    try:
        return performed > 0 and _without_annotations(mutated) == _without_annotations(source)
    except SyntaxError:
        return False


def pre_mutation(context):
    lines = _SCOPE.get(context.filename)
    if lines is None:
        context.skip = True
        return
    line = context.mutation_id.line_number + 1  # mutmut counts from 0
    if lines != "all" and not any(start <= line <= end for start, end in lines):
        context.skip = True
        return
    if _annotation_only(context):
        with _SKIPPED.open("a") as f:
            f.write(f"{line}:{context.mutation_id.index}\\n")
        context.skip = True
'''


def scope_lines(source: str, scope: tuple[str, ...] | None) -> list[tuple[int, int]] | str:
    """1-based (first, last) line ranges of the named definitions; "all" for no scope. Raises if a name is gone."""
    if scope is None:
        return "all"
    ranges, found = [], set()
    for name, node in definitions(ast.parse(source)):
        if name in scope:
            ranges.append((node.lineno, node.end_lineno))
            found.add(name)
    missing = set(scope) - found
    if missing:
        raise SystemExit(f"mutation: scope names not found (renamed? update TARGETS in tools/mutation.py): "
                         f"{sorted(missing)}")
    return ranges


def definitions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, class and module-level assigned name."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + node.name
            yield name, node
            yield from definitions(node, name + ".")
        elif not prefix and isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in t.elts if isinstance(t, ast.Tuple) else [t]:  # _RTOL, _ATOL = ...
                    if isinstance(name, ast.Name):
                        yield name.id, node


def enclosing(source: str, line: int) -> str:
    """The innermost definition holding ``line`` (1-based): "Class.method", "function", or "<module>"."""
    best, size = "<module>", None
    for name, node in definitions(ast.parse(source)):
        if node.lineno <= line <= node.end_lineno and (size is None or node.end_lineno - node.lineno < size):
            best, size = name, node.end_lineno - node.lineno
    return best


# --- running ------------------------------------------------------------------------------------------------------

TEST_LIMIT_S = 300  # one mutant's tests, at most
STALL_S = 360  # no new verdict in mutmut's cache for this long: mutmut has hung
ATTEMPTS = 20  # the cache fault strikes a few times per module; each restart resumes


def _run_until_stalled(command: list[str], tree: Path, env: dict[str, str], log_path: Path) -> int | None:
    """Run mutmut; its exit status, or None if it was killed: it or its worker died (a traceback in the log), or
    it recorded no verdict for ``STALL_S``."""
    cache = tree / ".mutmut-cache"
    with log_path.open("a") as log:
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat()} {' '.join(command)}\n")
        log.flush()
        offset = log.tell()
        started = time.time()
        proc = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None:
            time.sleep(5)
            with log_path.open() as f:
                f.seek(offset)
                worker_died = "Traceback (most recent call last)" in f.read()  # mutmut prints no others
            last = max(started, cache.stat().st_mtime if cache.is_file() else 0.0)
            if worker_died or time.time() - last > STALL_S:
                os.killpg(proc.pid, signal.SIGKILL)  # mutmut, its workers and their tests
                proc.wait()
                return None
    return proc.returncode


def run_module(key: str, fresh: bool, log_dir: Path) -> float:
    target = TARGETS[key]
    tree = WORK / key / "tree"
    if fresh and (WORK / key).exists():
        shutil.rmtree(WORK / key)
    tree.mkdir(parents=True, exist_ok=True)
    sync_tree(tree)
    scope = {target.path: scope_lines((tree / target.path).read_text(), target.scope)}
    (tree / "mutation_scope.json").write_text(json.dumps(scope))
    (tree / "mutmut_config.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "GANET_MUTATION": "1"}
    command = ["mutmut", "run", "--paths-to-mutate", target.path, "--tests-dir", "tests/", "--runner",
               runner(target), "--no-progress", "--simple-output", "-m", "4", "-b", "30"]
    start = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        returncode = _run_until_stalled(command, tree, env, log_dir / f"{key}.log")
        if returncode is not None:
            break
        # mutmut 2.5.1's cache sometimes loses a row mid-run; its worker dies and `mutmut run` waits for ever.
        # It resumes from its cache, once the scratch copy is restored (the killed run may have left a mutant in).
        print(f"mutation: {key}: mutmut's worker died or stalled; restarting ({attempt}/{ATTEMPTS})", flush=True)
        sync_tree(tree)
    else:
        raise SystemExit(f"mutation: mutmut kept stalling on {key}; see {log_dir / key}.log")
    seconds = time.perf_counter() - start
    if returncode & 1:  # mutmut's "fatal error" bit: the baseline failed, or mutmut itself broke
        raise SystemExit(f"mutation: mutmut failed on {key} (exit {returncode}); see {log_dir / key}.log")
    print(f"mutation: {key} done in {seconds / 60:.1f} min", flush=True)
    return seconds


# --- the report -------------------------------------------------------------------------------------------------

@dataclass
class Survivor:
    module: str
    function: str
    line: int
    before: str
    after: str
    status: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (f"{self.module}::{self.function}", self.before, self.after)


def results(key: str) -> tuple[dict[str, int], list[Survivor]]:
    target, tree = TARGETS[key], WORK / key / "tree"
    cache = tree / ".mutmut-cache"
    if not cache.is_file():
        return {}, []
    db = sqlite3.connect(cache)
    rows = db.execute("SELECT m.id, m.status, l.line_number FROM Mutant m JOIN Line l ON m.line = l.id "
                      "JOIN SourceFile s ON l.sourcefile = s.id WHERE s.filename = ?", (target.path,)).fetchall()
    counts: dict[str, int] = {}
    survivors = []
    source = (tree / target.path).read_text()
    for mutant_id, status, line_number in rows:
        counts[status] = counts.get(status, 0) + 1
        if status in (SURVIVED,):
            diff = subprocess.run(["mutmut", "show", str(mutant_id)], cwd=tree, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)}).stdout
            minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
            plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
            survivors.append(Survivor(target.path, enclosing(source, line_number + 1), line_number + 1,
                                      " ".join(minus), " ".join(plus), status))
    return counts, survivors


EXPLANATION = re.compile(r"^- `(?P<where>[^`]+)` ``(?P<before>.*?)`` → ``(?P<after>.*?)``: (?P<why>.+)$")


def hand_written() -> tuple[str, dict[tuple[str, str, str], str]]:
    """The hand-written part of docs/testing.md, and its explanations keyed by (module::function, before, after)."""
    text = DOC.read_text() if DOC.is_file() else ""
    if HAND_START in text:
        part = text.split(HAND_START, 1)[1].split(HAND_END, 1)[0].strip("\n")
    else:
        part = ("## Equivalent mutants\n\nSurvivors that no test can kill, because the mutant computes what the "
                "code computes. One line each, keyed by `module::function` and the line before and after the "
                "mutation (so an entry survives code moving):\n\n"
                "- `path::function` ``line before`` → ``line after``: why it is equivalent")
    keyed = {}
    for line in part.splitlines():
        if m := EXPLANATION.match(line.strip()):
            keyed[(m["where"], m["before"].strip(), m["after"].strip())] = m["why"]
    return part, keyed


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *{t.path for t in TARGETS.values()}, "tests"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + (" + uncommitted changes" if dirty else "")


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def write_report(minutes: dict[str, float]) -> float:
    part, explained = hand_written()
    rows, listed, total_killed, total_scored, annotation_only = [], [], 0, 0, 0
    for key, target in TARGETS.items():
        counts, survivors = results(key)
        skipped = WORK / key / "tree" / ANNOTATION_ONLY
        annotation_only += len(set(skipped.read_text().split())) if skipped.is_file() else 0
        killed = counts.get(KILLED, 0) + counts.get(TIMEOUT, 0) + counts.get(SUSPICIOUS, 0)
        equivalent = [s for s in survivors if s.key in explained]
        scored = killed + len(survivors)
        total_killed, total_scored = total_killed + killed, total_scored + scored
        score = f"{100 * killed / scored:.1f}%" if scored else "not run"
        score_eq = f"{100 * (killed + len(equivalent)) / scored:.1f}%" if scored else ""
        untested = counts.get(UNTESTED, 0)
        rows.append(f"| `{target.path}` | {'all' if target.scope is None else ', '.join(target.scope)} | {scored} | "
                    f"{killed} | {counts.get(TIMEOUT, 0)} | {len(survivors)} | {len(equivalent)} | {score} | "
                    f"{score_eq} |" + (f" {untested} not yet run |" if untested else ""))
        for s in survivors:
            why = explained.get(s.key)
            listed.append(f"- `{s.module}::{s.function}` ``{s.before}`` → ``{s.after}`` (line {s.line}): "
                          + (f"equivalent, see below" if why else "**not explained: kill it with a test or explain it "
                                                                  "below**"))
    overall = 100 * total_killed / total_scored if total_scored else 0.0
    if total_scored:
        measured = (f"Measured on commit `{commit()}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d')}, "
                    f"{machine()}; run time " + (", ".join(f"{k} {v / 60:.1f} min" for k, v in minutes.items())
                                                  or "in .mutation/logs/"))
    else:
        measured = "Not measured yet: run the command above (the table fills in as modules finish)"
    tests = "\n".join(f"- `{t.path}`: {t.why}. Tests: `{' '.join(t.tests)}`" + ("" if t.torch else " (no torch)")
                      for t in TARGETS.values())
    text = f"""# Testing

How the test suite is judged beyond "it passes": mutation testing of the code that guards users. A mutant is a
small change to the code (`<` to `<=`, a number plus one, `and` to `or`, a string or a value replaced); a good
suite fails on it ("kills" it). The target is at least 90% of mutants killed in each module below, and every
survivor either killed by a new test or explained as equivalent (it computes the same thing) in the hand-written
part at the end.

```bash
flock /tmp/ganet-heavy.lock tools/mutation.sh              # every module (resumes an interrupted run)
flock /tmp/ganet-heavy.lock tools/mutation.sh --module app # one module; --fresh to start over; --report to rewrite this file
```

It is not part of CI (too slow): mutmut 2 runs each module's fast tests once per mutant, in scratch copies under
`.mutation/` (your working tree is never mutated), two modules at a time. Everything above the hand-written part is
generated by `tools/mutation.py`; the modules, their scopes (function names, so code can move) and their tests are
the `TARGETS` table there.

## What is mutated, and which tests judge it

{tests}

## Score

{measured}. Killed includes timeouts (a mutant that makes the tests hang is caught). The last column counts
explained equivalent mutants as killed.

| module | scope | mutants | killed | of which timeouts | survived | equivalent | killed | with equivalents |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Overall: **{overall:.1f}%** of {total_scored} mutants killed. Not run, and in no column: {annotation_only}
mutants that change only a type annotation, equivalent by construction (every module here has `from __future__
import annotations`, so annotations are strings that nothing evaluates; the hook compares each mutant's syntax tree
with the original's, annotations blanked).

## Survivors

{chr(10).join(listed) or 'None.'}

{HAND_START}

{part}

{HAND_END}
"""
    DOC.parent.mkdir(exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(f"mutation: {overall:.1f}% of {total_scored} mutants killed; wrote {DOC}")
    return overall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/mutation.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--module", action="append", choices=list(TARGETS),
                   help="run only this module (repeatable); default: all")
    p.add_argument("--fresh", action="store_true", help="forget earlier results of the chosen modules")
    p.add_argument("--report", action="store_true", help="only rewrite docs/testing.md from the results so far")
    p.add_argument("--jobs", type=int, default=2, help="modules run at once (default 2: one per core here)")
    args = p.parse_args(argv)
    keys = args.module or list(TARGETS)
    minutes: dict[str, float] = {}
    if not args.report:
        for key in keys:  # a renamed scope stops the run before anything starts, not halfway through
            scope_lines((ROOT / TARGETS[key].path).read_text(), TARGETS[key].scope)
        log_dir = WORK / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        # The torch-free modules first (seconds a mutant): an interrupted run has measured the most modules.
        order = sorted(keys, key=lambda k: TARGETS[k].torch)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            minutes = dict(zip(order, pool.map(lambda k: run_module(k, args.fresh, log_dir), order)))
    write_report(minutes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
