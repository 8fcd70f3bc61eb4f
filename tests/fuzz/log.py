"""The record of fuzz runs: one JSON line per (type, mode) test, and its totals.

`record` appends a line to the file named by `FUZZ_LOG` (nothing without it); lines
from parallel workers interleave safely (each is one small append). Run as a module to
print the totals of a log:

    cd tests && python -m fuzz.log ../fuzz-log.jsonl
"""

import functools as ft
import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any


@ft.cache
def _commit() -> str:
    """The commit under test (with `+` when the working tree differs from it)."""
    here = os.path.dirname(__file__)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def record(**entry: Any) -> None:
    path = os.environ.get("FUZZ_LOG")
    if not path:
        return
    entry.setdefault("commit", _commit())
    line = json.dumps(entry, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)


def summary(path: str) -> str:
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    examples = sum(e["examples"] for e in entries)
    seconds = sum(e["seconds"] for e in entries)
    failed = [e for e in entries if e["outcome"] != "passed"]
    per_kind = Counter()
    for e in entries:
        per_kind[e["kind"]] += e["examples"]
    lines = [
        f"{examples} examples in {len(entries)} (type, mode) tests, "
        f"{_duration(seconds)} of test time (summed over workers); "
        f"{len(failed)} failed",
        "per type: " + ", ".join(f"{k} {n}" for k, n in sorted(per_kind.items())),
        "commits: " + ", ".join(sorted({e.get("commit", "unknown") for e in entries})),
    ]
    lines += [
        f"FAILED {e['kind']}-{e['mode']} (seed {e['seed']}): {e['outcome']}"
        for e in failed
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "fuzz-log.jsonl"))
