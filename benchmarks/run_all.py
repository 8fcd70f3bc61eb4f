"""`make bench`: every benchmark, once against quax (this repository) and once against
the Quax library (PyPI `quax==0.4.6`, same import name, so in its own virtual
environment `benchmarks/.venv-quax`, created on first use), then both side by side.

The two libraries alternate script by script, so both see the same machine load.
Each script's figures are ratios to plain JAX measured in its own rounds; where the
two libraries are compared, it is through those ratios (a ratio of ratios), never
through absolute times from different processes.

    python benchmarks/run_all.py [--quick] [--only trace,eager] [--no-quax]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
QUAX_VENV = os.path.join(HERE, ".venv-quax")
QUAX_VERSION = "0.4.6"
BENCHES = (
    "trace",
    "jit_reuse",
    "scan_layers",
    "dispatch_overhead",
    "eager",
    "lora_runtime",
    "zero",
    "sparse",
    "structured",
    "qlora",
)
OURS, THEIRS = "quax", "quax-pypi"


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def ensure_quax_venv() -> str:
    """The Quax library's virtual environment, with the JAX and equinox versions of
    this one, created if missing or stale."""
    import equinox
    import jax

    py = venv_python(QUAX_VENV)
    want = (QUAX_VERSION, jax.__version__, equinox.__version__)
    check = (
        "import quax, jax, equinox; "
        "print(quax.__version__, jax.__version__, equinox.__version__)"
    )
    if os.path.exists(py):
        out = subprocess.run(
            [py, "-c", check], capture_output=True, text=True, env=_env()
        )
        if tuple(out.stdout.split()) == want:
            return py
    print(
        f"creating {os.path.relpath(QUAX_VENV)} (quax=={QUAX_VERSION}) ...", flush=True
    )
    t0 = time.perf_counter()
    python3 = shutil.which("python3") or sys.executable
    subprocess.run([python3, "-m", "venv", "--clear", QUAX_VENV], check=True)
    pins = [
        f"quax=={QUAX_VERSION}",
        f"jax=={jax.__version__}",
        f"jaxlib=={jax.__version__}",
        f"equinox=={equinox.__version__}",
        "optax",
    ]
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", *pins], check=True, env=_env()
    )
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return py


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # never let this repository shadow the Quax library
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_one(py: str, bench: str, tag: str, quick: bool) -> bool:
    """Run one script; its old result is removed first, so a failure never leaves
    a stale figure in the table."""
    path = os.path.join(RESULTS, f"{bench}.{tag}.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [py, os.path.join(HERE, f"bench_{bench}.py")] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=HERE)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return proc.returncode == 0


def load(bench: str, tag: str) -> dict[str, Any] | None:
    path = os.path.join(RESULTS, f"{bench}.{tag}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    v, unit = row["value"], row.get("unit", "")
    if isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, int):
        text = str(v)
    elif unit == "x":
        text = f"{v:.2f}x"
    else:
        text = f"{v:.3g} {unit}".strip()
    if "spread" in row and unit != "":
        lo, hi = row["spread"]
        text += f" [{lo:.3g}-{hi:.3g}]" if unit != "x" else f" [{lo:.2f}-{hi:.2f}]"
    return text


def side_by_side(benches: tuple[str, ...]) -> list[str]:
    """Markdown tables, one per benchmark: quax next to Quax, and the targets."""
    lines: list[str] = []
    for bench in benches:
        ours, theirs = load(bench, OURS), load(bench, THEIRS)
        if ours is None and theirs is None:
            continue
        head = ours or theirs
        assert head is not None
        lines += ["", f"**{bench}**: {head['question']}", ""]
        lines += [f"| | quax | Quax {QUAX_VERSION} | target |", "|---|---|---|---|"]
        rows_t = {r["key"]: r for r in theirs["rows"]} if theirs else {}
        keys = [r["key"] for r in (ours or theirs)["rows"]]  # type: ignore[index]
        keys += [k for k in rows_t if k not in keys]
        rows_o = {r["key"]: r for r in ours["rows"]} if ours else {}
        for key in keys:
            o, t = rows_o.get(key), rows_t.get(key)
            desc = (o or t)["desc"]  # type: ignore[index]
            target = ""
            if o is not None and "target" in o:
                target = f"{o['target']}: {'met' if o['met'] else '**missed**'}"
            lines.append(f"| {desc} | {fmt(o)} | {fmt(t)} | {target} |")
        notes = [
            f"- {name}: {note}"
            for res, name in ((ours, "quax"), (theirs, f"Quax {QUAX_VERSION}"))
            for note in (res or {}).get("notes", [])
        ]
        lines += [""] + notes if notes else []
    return lines


#: The rows of the short table (README's Performance section): (bench, key, label).
HEADLINE = (
    ("trace", "mlp_first_ratio", "trace+lower, LoRA MLP 8x512 / plain"),
    ("trace", "transformer_first_ratio", "trace+lower, LoRA transformer / plain"),
    ("trace", "transformer_repeat_ratio", "same, library caches warm / plain"),
    (
        "trace",
        "transformer_cold_ratio",
        "same, from cold (JAX caches too) / plain cold",
    ),
    (
        "trace",
        "transformer_trace_repeat_ratio",
        "trace only, caches warm / plain trace",
    ),
    ("trace", "sweep32_ratio", "trace+lower, LoRA MLP depth 32 / plain"),
    ("jit_reuse", "same_walks", "jitted block x32: walks of its body"),
    ("jit_reuse", "same_ratio", "jitted block x32: trace / plain"),
    ("scan_layers", "fwd_full_weights", "scan over stacked LoRA: d x d weights formed"),
    ("scan_layers", "ratio", "scan over stacked LoRA: trace / plain"),
    ("dispatch_overhead", "first_ratio", "2000-eqn chain, first trace / plain"),
    ("dispatch_overhead", "repeat_ratio", "2000-eqn chain, repeated trace / plain"),
    ("eager", "mlp_vs_jit", "eager LoRA MLP / warm jit(dense)"),
    ("eager", "transformer_vs_jit", "eager LoRA transformer / warm jit(dense)"),
    ("eager", "transformer_vs_eager", "eager LoRA transformer / plain eager"),
    ("eager", "mlp_vs_jit_quax", "eager LoRA MLP / warm jit(quaxify(same))"),
    ("eager", "transformer_vs_jit_quax", "eager LoRA transformer / warm jit(quaxify)"),
    ("eager", "transformer_lora_program", "compiled LoRA transformer / dense, jitted"),
    ("lora_runtime", "d1024_fwdbwd_vs_hand", "LoRA fwd+bwd d=1024 / hand-written"),
    ("lora_runtime", "d2048_fwdbwd_vs_hand", "LoRA fwd+bwd d=2048 / hand-written"),
    ("lora_runtime", "d2048_fwdbwd_vs_mat", "LoRA fwd+bwd d=2048 / materialised"),
    ("lora_runtime", "d2048_mem_vs_full", "LoRA step peak memory / full fine-tune"),
    ("zero", "chain_ratio", "Zero: equations left in a 32-step chain"),
)


def headline() -> list[str]:
    lines = [f"| | quax | Quax {QUAX_VERSION} |", "|---|---|---|"]
    for bench, key, label in HEADLINE:
        cells = []
        for tag in (OURS, THEIRS):
            res = load(bench, tag)
            row = (
                next((r for r in res["rows"] if r["key"] == key), None) if res else None
            )
            cells.append(fmt(row))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return lines


def targets() -> list[str]:
    """The issue's targets, with this run's figures."""

    def row(bench: str, tag: str, key: str) -> dict[str, Any] | None:
        res = load(bench, tag)
        return next((r for r in res["rows"] if r["key"] == key), None) if res else None

    out = ["", "| target | measured | met |", "|---|---|---|"]

    def add(text: str, r: dict[str, Any] | None, at_most: float | None = None):
        if r is None:
            out.append(f"| {text} | not measured | - |")
            return
        met = r.get("met") if at_most is None else r["value"] <= at_most
        out.append(f"| {text} | {fmt(r)} | {'yes' if met else '**no**'} |")

    def vs_quax(text: str, bench: str, key: str, at_most: float = 1.0) -> None:
        o, t = row(bench, OURS, key), row(bench, THEIRS, key)
        if o is None or t is None:
            add(text, None)
            return
        add(text, {"value": o["value"] / t["value"], "unit": "x"}, at_most)

    # Issue 10 (quaxify as a jaxpr-to-jaxpr rewrite).
    add(
        "trace+lower, transformer, from cold (JAX's caches cleared too), <= 1.10x plain",
        row("trace", OURS, "transformer_cold_ratio"),
        1.10,
    )
    vs_quax(
        "same, <= 0.75x the Quax library's ratio (ratio of the ratios)",
        "trace",
        "transformer_cold_ratio",
        0.75,
    )
    for bench, key, label in (
        ("trace", "mlp_first_ratio", "trace+lower, MLP 8x512"),
        ("trace", "transformer_first_ratio", "trace+lower, transformer"),
        *(
            ("trace", f"sweep{d}_ratio", f"trace+lower, MLP depth {d}")
            for d in (2, 4, 8, 16, 32)
        ),
        ("scan_layers", "ratio", "scan over stacked LoRA layers"),
        ("jit_reuse", "same_ratio", "jitted block x32"),
        ("jit_reuse", "many_ratio", "32 layers through one jitted block"),
        ("dispatch_overhead", "first_ratio", "2000-equation chain, first trace"),
        ("dispatch_overhead", "repeat_ratio", "2000-equation chain, repeated trace"),
    ):
        vs_quax(f"{label}: ratio to plain <= the Quax library's", bench, key)
    add(
        "scan over stacked LoRA: trace <= 1.3x plain",
        row("scan_layers", OURS, "ratio"),
        1.3,
    )
    add(
        "repeated trace, caches warm, <= 0.10x plain (transformer, trace only)",
        row("trace", OURS, "transformer_trace_repeat_ratio"),
        0.10,
    )
    add(
        "per-equation dispatch from cold <= 1.2x plain tracing (2000-eqn chain)",
        row("dispatch_overhead", OURS, "first_ratio"),
        1.2,
    )
    add("eager MLP <= 1.2x warm jax.jit(dense)", row("eager", OURS, "mlp_vs_jit"), 1.2)
    add(
        "eager transformer <= 1.2x warm jax.jit(dense)",
        row("eager", OURS, "transformer_vs_jit"),
        1.2,
    )
    # Earlier issues.
    add(
        "dispatch overhead per equation <= 1.2x plain tracing (walk of a traced jaxpr)",
        row("dispatch_overhead", OURS, "repeat_ratio"),
    )
    add("same jitted block x32 walked once", row("jit_reuse", OURS, "same_walks"))
    add(
        "32 layers through one jitted block walked once",
        row("jit_reuse", OURS, "many_walks"),
    )
    for d in (1024, 2048):
        add(
            f"LoRA fwd+bwd d={d} <= 1.02x hand-written",
            row("lora_runtime", OURS, f"d{d}_fwdbwd_vs_hand"),
        )
        add(
            f"LoRA step d={d}: no full-size temporary",
            row("lora_runtime", OURS, f"d{d}_no_full_grad"),
        )
    add(
        "scan over stacked LoRA: no full weight (forward)",
        row("scan_layers", OURS, "fwd_full_weights"),
    )
    add(
        "scan over stacked LoRA: no full weight (gradient)",
        row("scan_layers", OURS, "grad_full_weights"),
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--no-quax", action="store_true", help="skip the Quax library")
    args = parser.parse_args()
    benches = tuple(b for b in BENCHES if not args.only or b in args.only.split(","))
    t0 = time.perf_counter()
    theirs_py = None if args.no_quax else ensure_quax_venv()
    failed = []
    for bench in benches:
        print(f"\n##### {bench}", flush=True)
        if not run_one(sys.executable, bench, OURS, args.quick):
            failed.append(f"{bench} (quax)")
        if theirs_py is not None and not run_one(theirs_py, bench, THEIRS, args.quick):
            failed.append(f"{bench} (Quax {QUAX_VERSION})")
    import jax

    first = load(benches[0], OURS)
    device = first["device"] if first else "?"
    mode = "quick" if args.quick else "full"
    lines = [f"Measured on {device}, jax {jax.__version__}, {mode} run."]
    if failed:
        lines += ["", "**Failed** (see the log above): " + ", ".join(failed)]
    lines += ["", "**Headline**", ""] + headline()
    lines += ["", "**Targets**"] + targets()
    lines += ["", "**Every figure**"] + side_by_side(benches)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + "=" * 80 + "\nquax vs Quax " + QUAX_VERSION + "\n" + text)
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s; the table is in benchmarks/results/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
