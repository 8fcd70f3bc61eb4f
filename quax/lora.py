"""LoRA: low-rank adaptation of existing models' weights, for any layer kind and any
model library: `loraify` picks weights, `trainable` selects the adapters, `merge`
folds them back (the type and its rules are in `quax.types.lora`)."""

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._values import Value
from .types.lora import LoraArray as LoraArray


#: The equinox layers `loraify` adapts by default (their weights' first axis is the
#: output: `Linear` `(out, in)`, `Conv` `(out, in, *spatial)`, `Embedding` `(vocab,
#: features)`).
_LAYERS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.Embedding)

Layout = Literal["in_out", "out_in"] | int


def is_lora(x: Any) -> bool:
    return isinstance(x, LoraArray)


def loraify(
    model: PyTree,
    *,
    rank: int,
    scale: float = 0.01,
    allow_materialise: bool = False,
    stop_gradient: bool = True,
    key: PRNGKeyArray,
    where: Callable[[Any], bool] | str | Sequence[str] | None = None,
    alpha: float | None = None,
    dtype: Any = None,
    layout: Layout = "in_out",
) -> PyTree:
    """Replace weights in `model` by `LoraArray`s: by default the weight of every
    `eqx.nn.Linear` (anywhere in the pytree, including inside
    `eqx.nn.MultiheadAttention`); with `where`, also `eqx.nn.Conv` (1-D, 2-D, 3-D) and
    `eqx.nn.Embedding` layers, and, when `where` is a path pattern, any floating array
    (or quantized weight) of at least two axes whose path matches: the parameters of
    any pytree (flax linen `params`, nnx state, plain dicts).

    **Arguments:**

    - `model`: any pytree: an equinox Module, a flax `params` dict, an nnx `State`.
    - `rank`, `scale`, `allow_materialise`, `stop_gradient`, `alpha`, `dtype`: as for
        `LoraArray`.
    - `key`: a JAX PRNG key; each adapted weight gets its own subkey.
    - `where`: which weights to adapt (default: every `eqx.nn.Linear`). Either a
        predicate on the equinox layer (`Linear`, `Conv` or `Embedding`); or, as peft's `target_modules`, a string (a
        regular expression that must match the whole path) or a list of strings (a
        path matches if it equals one of them or ends with `"." + name`). Paths are
        written as in PyTorch: `"blocks.0.attn.query_proj"` for an equinox layer,
        `"params.Dense_0.kernel"` for an array (an nnx `Variable`'s trailing `.value`
        is dropped).
    - `layout`: for arrays matched by path, which axes are the rows of the low-rank
        view (the rest being its columns): `"in_out"` (flax: every axis but the last
        is an input axis, e.g. a `(kh, kw, in, out)` conv kernel or an `(in, out)`
        dense kernel), `"out_in"` (PyTorch/equinox: the first axis is the output), or
        an int, the number of row axes. Equinox layers know their own layout.

    **Returns:**

    A copy of `model` whose selected weights are `LoraArray`s. Call it through
    `quax.quaxify(...)`; train only the adapters with
    `eqx.partition(model, quax.lora.trainable(model))`.
    """
    select = _selector(where)
    by_path = isinstance(where, str) or (
        isinstance(where, Sequence) and not callable(where)
    )
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=_is_leaf)
    chosen: list[tuple[int, bool]] = []  # (position, whether it is a layer)
    for i, (path, leaf) in enumerate(flat):
        if isinstance(leaf, _LAYERS):
            if _adaptable(leaf.weight) and select(_path_str(path), leaf):
                chosen.append((i, True))
        elif by_path and _adaptable(leaf) and select(_array_path(path), leaf):
            chosen.append((i, False))
    keys = jr.split(key, max(len(chosen), 1))
    leaves = [leaf for _, leaf in flat]

    def adapt(
        weight: Any, subkey: Any, row_ndim: int, batch_ndim: int = 0
    ) -> LoraArray:
        return LoraArray(
            weight,
            rank=rank,
            scale=scale,
            allow_materialise=allow_materialise,
            stop_gradient=stop_gradient,
            key=subkey,
            alpha=alpha,
            dtype=dtype,
            row_ndim=row_ndim,
            batch_ndim=batch_ndim,
        )

    for (i, is_layer), subkey in zip(chosen, keys, strict=False):
        if is_layer:
            layer = leaves[i]
            lora = adapt(layer.weight, subkey, 1, _stack_ndim(layer))
            leaves[i] = eqx.tree_at(lambda layer: layer.weight, layer, lora)
        else:
            leaves[i] = adapt(
                leaves[i], subkey, _row_ndim(layout, len(leaves[i].shape))
            )
    return jtu.tree_unflatten(treedef, leaves)


def _stack_ndim(layer: Any) -> int:
    """How many leading axes of an equinox layer's weight stack copies of the layer
    (`eqx.filter_vmap` of its constructor): its own weight is `(out, in, *spatial)`."""
    own = 2 + getattr(layer, "num_spatial_dims", 0)
    return max(len(jnp.shape(layer.weight)) - own, 0)


def merge(model: PyTree) -> PyTree:
    """Replace every `LoraArray` in `model` by the dense array `w + scaling * a @ b`,
    for deployment without quax (a quantized `w` is dequantized first).

    **Returns:**

    A copy of `model` with plain arrays in place of `LoraArray`s.
    """
    return jtu.tree_map(
        lambda x: x._dense(frozen=False) if is_lora(x) else x, model, is_leaf=is_lora
    )


def trainable(model: PyTree) -> PyTree:
    """A filter selecting exactly the adapter parameters (`a` and `b` of each
    `LoraArray`) of `model`: a pytree of bools, for `eqx.partition`, `eqx.filter`
    and `optax.masked`.

    **Returns:**

    A pytree with the structure of `model`: `True` at every `LoraArray`'s `a` and `b`,
    `False` everywhere else (including `w`).

    !!! Example

        ```python
        params, static = eqx.partition(model, quax.lora.trainable(model))
        eqx.tree_serialise_leaves("adapters.eqx", params)  # only the adapters
        ```
    """

    def spec(x: Any) -> Any:
        if is_lora(x):
            return eqx.tree_at(
                lambda lora: (lora.w, lora.a, lora.b), x, (False, True, True)
            )
        return False

    return jtu.tree_map(spec, model, is_leaf=is_lora)


# -- private helpers ------------------------------------------------------------------


def _is_leaf(x: Any) -> bool:
    return isinstance(x, _LAYERS) or isinstance(x, Value)


def _adaptable(x: Any) -> bool:
    """A floating array or a value (a quantized weight) with at least two axes, and
    not already adapted."""
    if is_lora(x):
        return False
    if isinstance(x, Value):
        return len(getattr(x.aval(), "shape", ())) >= 2
    return (
        hasattr(x, "dtype")
        and jnp.issubdtype(x.dtype, jnp.floating)
        and len(getattr(x, "shape", ())) >= 2
    )


def _row_ndim(layout: Layout, ndim: int) -> int:
    if layout == "in_out":
        return ndim - 1
    if layout == "out_in":
        return 1
    if isinstance(layout, int) and 0 < layout < ndim:
        return layout
    raise ValueError(
        f'`loraify(layout=...)` takes "in_out", "out_in" or a number of row axes '
        f"between 1 and {ndim - 1} (for a weight with {ndim} axes); got {layout!r}."
    )


def _path_str(path: Sequence[Any]) -> str:
    return jtu.keystr(tuple(path), simple=True, separator=".")


def _array_path(path: Sequence[Any]) -> str:
    return _path_str(path).removesuffix(".value")


def _selector(where: Any) -> Callable[[str, Any], bool]:
    if where is None:
        return lambda path, leaf: isinstance(leaf, eqx.nn.Linear)
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda path, leaf: pattern.fullmatch(path) is not None
    if isinstance(where, Sequence):
        names = tuple(where)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(
                "`loraify(where=...)` takes a predicate on the layer, a regular "
                f"expression, or a list of path names; got {where!r}."
            )
        return lambda path, leaf: any(
            path == n or path.endswith("." + n) for n in names
        )
    if callable(where):
        return lambda path, leaf: isinstance(leaf, _LAYERS) and bool(where(leaf))
    raise TypeError(
        "`loraify(where=...)` takes a predicate on the layer, a regular expression, or "
        f"a list of path names; got {where!r} of type {type(where).__name__}."
    )
