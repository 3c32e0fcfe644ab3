"""Before/after: one benchmark script run on two revisions of gruserve, alternately, in one run.

    python bench/ab.py --before 1f95e30 --runs 3 -- engine.py --spinning off --rounds 2

The `--before` revision is checked out into a temporary git worktree and imported through a
path shim (a `gruserve` package whose subpackages point into that worktree), with the same
interpreter and dependencies as the working tree: only gruserve's code differs. Runs
alternate before, after, before, after, ... so that drifts in the machine's load fall on
both sides. The script's output is kept under bench/results/ab-<script>.txt; the figure
compared is the first bold ratio (`**0.92x**`) of each report, which for engine.py is the
engine's tokens/s over the raw ORT loop's at 256 concurrent requests (itself measured side
by side inside each run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine_line  # bench/machine.py

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIGURE = re.compile(r"\*\*([0-9.]+)x\*\*")


def _shim(worktree: Path, into: Path) -> Path:
    """A directory to put first on PYTHONPATH so that `gruserve.*` imports the worktree."""
    package = into / "gruserve"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, target in (("runtime", "runtime"), ("export", "export"),
                         ("v1", "protos/gruserve/v1")):
        (package / name).symlink_to(worktree / target)
    return into


def _run(tree: Path, script: list[str], env: dict) -> tuple[float, str]:
    cmd = [sys.executable, str(tree / "bench" / script[0]), *script[1:], "--no-write"]
    done = subprocess.run(cmd, cwd=tree / "bench", env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    match = FIGURE.search(done.stdout)
    if not match:
        raise SystemExit(f"no **N.NNx** figure in the output of {' '.join(cmd)}")
    return float(match.group(1)), done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("script", nargs=argparse.REMAINDER,
                        help="-- SCRIPT [ARGS]: a bench/ script and its arguments")
    args = parser.parse_args(argv)
    script = [a for a in args.script if a != "--"]
    if not script:
        parser.error("give the benchmark script after --")
    figures: dict[str, list[float]] = {"before": [], "after": []}
    logs = []
    with tempfile.TemporaryDirectory(prefix="gruserve-ab-") as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), args.before],
                       cwd=ROOT, check=True)
        try:
            shim = _shim(worktree, Path(tmp) / "shim")
            before_env = dict(os.environ, PYTHONPATH=str(shim))
            for run in range(args.runs):
                for side, tree, env in (("before", worktree, before_env),
                                        ("after", ROOT, dict(os.environ))):
                    figure, out = _run(tree, script, env)
                    figures[side].append(figure)
                    logs.append(f"## run {run} {side}: {figure:.2f}x\n\n{out}")
                    print(f"# run {run} {side}: {figure:.2f}x", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)
    before, after = (statistics.median(figures[k]) for k in ("before", "after"))
    summary = (
        f"# bench/ab.py {' '.join(script)}\n\n"
        f"- command: `python bench/ab.py --before {args.before} --runs {args.runs} -- "
        f"{' '.join(script)}`\n"
        f"- machine: {machine_line()}\n"
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- before ({args.before}): {', '.join(f'{x:.2f}x' for x in figures['before'])}; "
        f"median {before:.2f}x\n"
        f"- after (working tree): {', '.join(f'{x:.2f}x' for x in figures['after'])}; "
        f"median {after:.2f}x\n"
    )
    print(summary)
    out = BENCH / "results" / f"ab-{Path(script[0]).stem}.txt"
    out.write_text(summary + "\n" + "\n".join(logs), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
