"""Shared by every benchmark: which library is loaded, interleaved timing, models,
result rows, the printed table and the JSON file.

The same code runs against quax (this repository) and against the Quax library
(PyPI `quax==0.4.6`), which has the same import name; `run_all.py` runs it once in
each virtual environment. Library differences live in `_adapters.py`.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import quax


#: True for this repository's quax, False for the Quax library from PyPI.
OURS = hasattr(quax, "Value") and hasattr(quax, "handler_name")
LIBRARY = "quax" if OURS else "Quax"
VERSION = getattr(quax, "__version__", "?")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# -- timing ----------------------------------------------------------------------------


Variant = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]


def interleave(
    variants: dict[str, Variant], rounds: int, warmup: int = 1, number: int = 1
) -> dict[str, list[float]]:
    """Time each variant once per round, alternating the order between rounds so
    neither side always runs first; returns seconds per call, one per round.

    A variant is a zero-argument callable, or `(setup, fn)` where `setup()` runs
    untimed before each timing. `number` calls are timed together (for calls too
    short to time singly). Warm-up rounds are not recorded. As in `timeit`, the
    garbage collector is off during a timing (it runs, untimed, before each)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(warmup + rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                v = variants[name]
                setup, fn = v if isinstance(v, tuple) else (None, v)
                if setup is not None:
                    setup()
                # As `timeit`: no garbage collection inside a timing; collect between.
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                dt = (time.perf_counter() - t0) / number
                gc.enable()
                if r >= warmup:
                    times[name].append(dt)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, lower quartile, upper quartile) of `samples`."""
    xs = sorted(samples)
    if len(xs) < 4:
        return statistics.median(xs), xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[0], q[2]


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios: both sides of each ratio come from the same round."""
    return [a / b for a, b in zip(num, den, strict=True)]


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


# -- models ----------------------------------------------------------------------------


def mlp(depth: int = 8, width: int = 512, *, key: Any) -> eqx.nn.MLP:
    return eqx.nn.MLP(width, width, width, depth, key=key)


class Block(eqx.Module):
    """Pre-norm transformer block: attention and a gelu MLP, each with a residual."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, d_model: int, heads: int, *, key: Any):
        k1, k2, k3 = jr.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(d_model)
        self.attn = eqx.nn.MultiheadAttention(heads, d_model, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d_model)
        self.fc1 = eqx.nn.Linear(d_model, 4 * d_model, key=k2)
        self.fc2 = eqx.nn.Linear(4 * d_model, d_model, key=k3)

    def __call__(self, x: Any) -> Any:
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.ln2)(x)
        h = jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))
        return x + h


class Transformer(eqx.Module):
    """A small decoder-free language model built only from equinox layers."""

    embed: eqx.nn.Embedding
    blocks: list[Block]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self, layers: int, d_model: int, heads: int = 4, vocab: int = 1000, *, key: Any
    ):
        keys = jr.split(key, layers + 2)
        self.embed = eqx.nn.Embedding(vocab, d_model, key=keys[0])
        self.blocks = [Block(d_model, heads, key=k) for k in keys[1:-1]]
        self.ln_f = eqx.nn.LayerNorm(d_model)
        self.head = eqx.nn.Linear(d_model, vocab, key=keys[-1])

    def __call__(self, tokens: Any) -> Any:
        x = jax.vmap(self.embed)(tokens)
        for blk in self.blocks:
            x = blk(x)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


def tokens(seq: int, vocab: int = 1000) -> Any:
    return jnp.arange(seq, dtype=jnp.int32) % vocab


def walked(closed: Any) -> Any:
    """The program a library walked, from `jax.make_jaxpr(quaxify(f))(...)`: ours
    binds it as one `jit` equation inside a trace, so look inside that; otherwise
    (the Quax library) the jaxpr itself."""
    eqns = closed.jaxpr.eqns
    if len(eqns) == 1 and eqns[0].primitive.name in ("jit", "pjit"):
        (eqn,) = eqns
        if list(eqn.invars) == list(closed.jaxpr.invars) and list(eqn.outvars) == list(
            closed.jaxpr.outvars
        ):
            return eqn.params["jaxpr"]
    return closed


def count_eqns(jaxpr: Any) -> tuple[int, int]:
    """(top-level equations, equations including those of every sub-jaxpr)."""
    import jax.extend.core as jexc

    def nested(j: Any) -> int:
        n = 0
        for eqn in j.eqns:
            n += 1
            for sub in jexc.jaxprs_in_params(eqn.params):
                n += nested(sub)
        return n

    inner = jaxpr.jaxpr if hasattr(jaxpr, "consts") else jaxpr
    return len(inner.eqns), nested(inner)


# -- results ---------------------------------------------------------------------------


class Results:
    """The rows of one benchmark run, printed as a table and written as JSON.

    A row has a stable `key` (used to line the two libraries up), a description,
    a value with its spread (lower, upper quartile, or min/max when few samples) and
    a unit. `better` says which direction is good ("lower", "higher" or "")."""

    def __init__(self, bench: str, question: str, mode: str):
        self.bench = bench
        self.question = question
        self.mode = mode
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(
        self,
        key: str,
        desc: str,
        value: Any,
        unit: str = "",
        spread: tuple[float, float] | None = None,
        n: int | None = None,
        target: str | None = None,
        met: bool | None = None,
    ) -> None:
        row: dict[str, Any] = {"key": key, "desc": desc, "value": value, "unit": unit}
        if spread is not None:
            row["spread"] = [spread[0], spread[1]]
        if n is not None:
            row["n"] = n
        if target is not None and OURS:  # the targets are this repository's
            row["target"] = target
            row["met"] = met
        self.rows.append(row)

    def add_time(self, key: str, desc: str, samples: Sequence[float], scale=1e3):
        """Seconds -> milliseconds (or another `scale`) with quartiles."""
        med, lo, hi = summary(samples)
        unit = {1e3: "ms", 1e6: "us"}.get(scale, "")
        self.add(key, desc, med * scale, unit, (lo * scale, hi * scale), len(samples))

    def add_ratio(
        self,
        key: str,
        desc: str,
        rs: Sequence[float],
        at_most: float | None = None,
        unit: str = "x",
    ) -> None:
        """The median of per-round ratios with quartiles; `at_most` is a target."""
        med, lo, hi = summary(rs)
        if at_most is None:
            self.add(key, desc, med, unit, (lo, hi), len(rs))
        else:
            target, met = f"<= {at_most}x", med <= at_most
            self.add(key, desc, med, unit, (lo, hi), len(rs), target, met)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "question": self.question,
            "library": LIBRARY,
            "library_version": VERSION,
            "jax": jax.__version__,
            "equinox": eqx.__version__,
            "python": platform.python_version(),
            "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
            "mode": self.mode,
            "rows": self.rows,
            "notes": self.notes,
        }

    def print_table(self) -> None:
        print(f"\n== {self.bench}: {self.question}  [{LIBRARY} {VERSION}]")
        width = max([len(r["desc"]) for r in self.rows] + [10])
        for r in self.rows:
            print(f"  {r['desc']:<{width}}  {format_value(r)}")
        for text in self.notes:
            print(f"  note: {text}")

    def write(self, out_dir: str | None = None) -> str:
        out_dir = out_dir or RESULTS_DIR
        os.makedirs(out_dir, exist_ok=True)
        tag = "quax" if OURS else "quax-pypi"
        path = os.path.join(out_dir, f"{self.bench}.{tag}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.as_json(), f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        return path


def format_value(row: dict[str, Any]) -> str:
    v, unit = row["value"], row.get("unit", "")
    if isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, int):
        text = f"{v}"
    elif isinstance(v, float):
        text = f"{v:.3g}" if unit == "x" else f"{v:.4g}"
    else:
        text = str(v)
    if unit and unit not in ("x",) and not isinstance(v, bool):
        text += f" {unit}"
    elif unit == "x":
        text += "x"
    if "spread" in row:
        lo, hi = row["spread"]
        text += f" [{lo:.3g}-{hi:.3g}]"
    if "met" in row and row["met"] is not None:
        text += f"  (target {row['target']}: {'met' if row['met'] else 'MISSED'})"
    return text


def main(run: Callable[..., Results], argv: Sequence[str] | None = None) -> Results:
    """Command-line entry point shared by the scripts: `--quick` for a smoke run,
    `--out DIR` for where the JSON goes. `run(mode)` gets "full", "quick" or (from
    the tests only) "tiny", the smallest configuration."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few rounds, small sizes")
    parser.add_argument("--out", default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    res = run(mode="quick" if args.quick else "full")
    res.print_table()
    path = res.write(args.out)
    print(f"  -> {os.path.relpath(path)}", file=sys.stderr)
    return res
