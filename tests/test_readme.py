"""Every ```python block of README.md runs as written, in order, in one namespace."""

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
            try:
                exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
            except Exception as err:  # pragma: no cover - the message is the point
                raise AssertionError(
                    f"README python block {i} failed:\n{block}"
                ) from err
