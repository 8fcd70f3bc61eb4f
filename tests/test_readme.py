"""Every ```python block of README.md runs as written, in order, in one namespace."""

import contextlib
import pathlib
import re

import jax


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README.md has no python examples"
    namespace: dict = {}
    with jax.numpy_rank_promotion("allow"):
        for i, block in enumerate(blocks):
            # JAX 0.10.2's leak checker crashes on lineax's `linear_solve`, with or
            # without quax (see tests/test_solvers.py): such blocks run without it.
            leaks = (
                jax.check_tracer_leaks(False)
                if "lineax" in block
                else contextlib.nullcontext()
            )
            try:
                with leaks:
                    exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the message is the point
                raise AssertionError(
                    f"README python block {i} failed:\n{block}"
                ) from err
