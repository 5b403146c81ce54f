"""Old code vs new code on this machine, in lockstep: is a change within a few percent on the CPU?

Figures drift by +-5% between runs on shared machines, so a change is judged against the old code
measured in the same run, not against the README. The old revision is checked out into a temporary
git worktree; each round runs bench/engine_overhead.py (part 1: base-only and mixed-adapter
throughput) once in each tree, in alternating order, and the medians are compared.

    python bench/old_vs_new.py --old b227690 --rounds 5 -- --preset small --requests 64 --adapters 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("base_tokens_per_s", "mixed_tokens_per_s")


def measure(tree: Path, bench_args: list[str], cache: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "bench/engine_overhead.py", "--skip-static", "--rounds", "1"]
        command += ["--cache", str(cache), "--json", out.name, *bench_args]
        subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("bench_args", nargs="*", help="passed to bench/engine_overhead.py (after --)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="reft-old-") as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True)
        try:
            trees = {"old": old_tree, "new": ROOT}
            for round_index in range(args.rounds):
                order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
                for which in order:
                    results[which].append(measure(trees[which], args.bench_args, args.cache.resolve()))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    print(f"old = {args.old}, new = the working tree; medians of {args.rounds} alternating rounds")
    for figure in FIGURES:
        old = statistics.median(r[figure] for r in results["old"])
        new = statistics.median(r[figure] for r in results["new"])
        print(f"  {figure:20s} old {old:9.1f}  new {new:9.1f}  new/old {new / old:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
