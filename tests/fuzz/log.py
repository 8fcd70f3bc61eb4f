"""The record of fuzz runs: one JSON line per (type, mode) test, and its totals.

`record` appends a line to the file named by `FUZZ_LOG` (nothing without it); lines
from parallel workers interleave safely (each is one small append). Each line names
the commit and the git tree of `quax/` it tested, so that a long run can be resumed in
a later session (`passed_before`: `make fuzz FUZZ_RESUME=1` skips what already passed
on the same `quax/`). Run as a module to print the totals of a log:

    cd tests && python -m fuzz.log ../fuzz-log.jsonl
"""

import functools as ft
import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args],
            cwd=os.path.dirname(__file__),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@ft.cache
def quax_tree() -> str | None:
    """The git tree of `quax/` under test; None if it differs from the commit's."""
    if _git("status", "--porcelain", "--untracked-files=all", "--", "../../quax"):
        return None
    return _git("rev-parse", "HEAD:quax")


def _tree_of(entry: dict[str, Any]) -> str | None:
    if "quax_tree" in entry:
        return entry["quax_tree"]
    commit = entry.get("commit", "unknown")  # lines written before `quax_tree` was
    if commit == "unknown" or commit.endswith("+"):
        return None
    return _git("rev-parse", f"{commit}:quax")


def passed_before(kind: str, mode: str, examples: int) -> dict[str, Any] | None:
    """A line of `FUZZ_LOG` in which the test of (`kind`, `mode`) passed with at least
    `examples` programs on the `quax/` under test now, if any."""
    path = os.environ.get("FUZZ_LOG")
    tree = quax_tree()
    if not path or tree is None or not os.path.exists(path):
        return None
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    for e in entries:
        if (
            (e["kind"], e["mode"]) == (kind, mode)
            and e["outcome"] == "passed"
            and e["examples"] >= examples
            and _tree_of(e) == tree
        ):
            return e
    return None


@ft.cache
def _commit() -> str:
    """The commit under test (with `+` when the working tree differs from it)."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if head is None:
        return "unknown"
    return head + ("+" if dirty else "")


def record(**entry: Any) -> None:
    path = os.environ.get("FUZZ_LOG")
    if not path:
        return
    entry.setdefault("commit", _commit())
    entry.setdefault("quax_tree", quax_tree())
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
        "quax/ trees: " + ", ".join(sorted({str(_tree_of(e))[:10] for e in entries})),
    ]
    passed = {
        (e["kind"], e["mode"], _tree_of(e)) for e in entries if e["outcome"] == "passed"
    }
    clean = sum(e["examples"] for e in entries if e["outcome"] == "passed")
    lines.append(f"passed: {clean} examples in {len(entries) - len(failed)} tests")
    lines += [
        f"FAILED {e['kind']}-{e['mode']} (seed {e['seed']}): {e['outcome']}"
        + (
            " [passed when run again on the same quax/]"
            if (e["kind"], e["mode"], _tree_of(e)) in passed
            else ""
        )
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
