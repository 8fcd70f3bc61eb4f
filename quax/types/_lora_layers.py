"""LoRA's rules for convolution kernels and embedding tables (`LoraArray`'s
`rconv_general_dilated` and `gather` handlers).

A conv kernel's low-rank view groups its axes into rows and columns. When one group
is exactly the output-feature axis (peft's choice: `(out, in * kh * kw)`), the update
is a convolution with the other adapter (rank output features) followed by a
pointwise product with the first; when one group is exactly the input-feature axis, a
pointwise product comes first. Either way the result is `conv(x, w)` plus two thin
products, and `a @ b` is never formed.
"""

from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .lora import (
    LoraArray,
    _bind,
    _cast,
    _declines_precision,
    _frozen,
    _pair,
    _precisions,
    _shape,
    _unknown,
    _update_dtype,
)


_CONV_PARAMS = frozenset(
    {
        "window_strides",
        "padding",
        "lhs_dilation",
        "rhs_dilation",
        "dimension_numbers",
        "feature_group_count",
        "batch_group_count",
        "precision",
        "preferred_element_type",
        "out_sharding",
    }
)
_GATHER_PARAMS = frozenset(
    {"slice_sizes", "mode", "fill_value", "unique_indices", "indices_are_sorted"}
)


def lora_conv(lora: LoraArray, x: Array, params: dict[str, Any]) -> Any:
    """`conv_general_dilated(x, lora, **params)` without forming `a @ b`, or
    `NotImplemented`."""
    preferred = params.get("preferred_element_type")
    if (
        _unknown(params, _CONV_PARAMS)
        or params.get("out_sharding") is not None
        or params["feature_group_count"] != 1
        or params["batch_group_count"] != 1
        or lora.batch_ndim != 0
        or (preferred is not None and not jnp.issubdtype(preferred, jnp.inexact))
        or _declines_precision(params.get("precision"))
    ):
        return NotImplemented
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    o_axis, i_axis, spatial = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    k, nr = len(_shape(lora.w)), lora.row_ndim
    rows, cols = set(range(nr)), set(range(nr, k))
    a = (lora.a, [*range(nr), "rank"])
    b = (lora.b, ["rank", *range(nr, k)])
    if rows == {o_axis} or cols == {o_axis}:
        out_adapter, in_adapter = (a, b) if rows == {o_axis} else (b, a)
        conv_first = True
    elif rows == {i_axis} or cols == {i_axis}:
        in_adapter, out_adapter = (a, b) if rows == {i_axis} else (b, a)
        conv_first = False
    else:
        return NotImplemented  # both feature axes in one group: no thin factorisation

    dense = _bind(lax.conv_general_dilated_p, x, _frozen(lora), **params)
    dtype = _update_dtype(lora, x, preferred)
    p_lora, p_x = _precisions(params.get("precision"), lora_is_lhs=False)
    precision = _pair(p_x, p_lora)
    plain = lax.ConvDimensionNumbers(lhs_spec, tuple(range(k)), out_spec)
    conv_params = dict(
        params,
        dimension_numbers=plain,
        precision=precision,
        preferred_element_type=dtype,
    )

    def arrange(adapter: tuple[Array, list[Any]], order: list[Any]) -> Array:
        array, axes = adapter
        return lax.transpose(_cast(array, dtype), tuple(axes.index(o) for o in order))

    x = _cast(x, dtype)
    if conv_first:  # conv(x, in-adapter as a rank-feature kernel), then pointwise
        kernel = arrange(in_adapter, ["rank", i_axis, *spatial])
        t = lax.conv_general_dilated_p.bind(x, kernel, **conv_params)
        t = _scaled(t, lora.scaling)
        update = _pointwise(t, arrange(out_adapter, ["rank", o_axis]), out_spec[1])
    else:  # pointwise to rank features, then conv with the out-adapter
        t = _pointwise(x, arrange(in_adapter, [i_axis, "rank"]), lhs_spec[1])
        t = _scaled(t, lora.scaling)
        kernel = arrange(out_adapter, [o_axis, "rank", *spatial])
        update = lax.conv_general_dilated_p.bind(t, kernel, **conv_params)
    return dense + _cast(update, dense.dtype)


def lora_gather(
    lora: LoraArray, indices: Array, dimension_numbers: Any, params: dict[str, Any]
) -> Any:
    """A gather that looks up rows (whole columns, none collapsed, nothing batched):
    `w[i] + a[i] @ b` as a plain array, or `NotImplemented`. Out-of-bounds rows in `"fill"` mode get the
    fill value exactly (the update is masked out there)."""
    if _unknown(params, _GATHER_PARAMS) or lora.batch_ndim != 0:
        return NotImplemented
    dnums = dimension_numbers
    shape = _shape(lora.w)
    k, nr = len(shape), lora.row_ndim
    nc = k - nr
    sizes = tuple(params["slice_sizes"])
    out_ndim = len(dnums.offset_dims) + indices.ndim - 1
    trailing = tuple(range(out_ndim - nc, out_ndim))
    if (
        dnums.operand_batching_dims
        or nc == 0
        or any(d >= nr for d in dnums.collapsed_slice_dims)
        or any(sizes[c] != shape[c] for c in range(nr, k))
        or tuple(dnums.offset_dims[-nc:]) != trailing
    ):
        return NotImplemented
    dense = _bind(
        lax.gather_p, _frozen(lora), indices, dimension_numbers=dnums, **params
    )
    fill = params["mode"] == lax.GatherScatterMode.FILL_OR_DROP
    # Columns are whole, so a start index into them (from `vmap` of a dynamic slice)
    # only matters out of bounds (masked below); `a` is indexed by the row starts.
    rows = [j for j, d in enumerate(dnums.start_index_map) if d < nr]
    a_dnums = dnums._replace(
        offset_dims=(*dnums.offset_dims[:-nc], out_ndim - nc),
        start_index_map=tuple(dnums.start_index_map[j] for j in rows),
    )
    t = lax.gather_p.bind(
        lora.a,
        jnp.take(indices, np.asarray(rows, np.int32), axis=-1),
        dimension_numbers=a_dnums,
        **dict(
            params,
            slice_sizes=(*sizes[:nr], lora.rank),
            fill_value=0 if fill else params["fill_value"],
        ),
    )
    t = _scaled(t, lora.scaling)
    update = lax.dot_general(t, lora.b, (((t.ndim - 1,), (0,)), ((), ())))
    if fill:  # rows whose index is out of bounds hold exactly the fill value
        upper = np.array([shape[d] - sizes[d] for d in dnums.start_index_map])
        upper = lax.broadcast_in_dim(
            jnp.asarray(upper, indices.dtype), indices.shape, (indices.ndim - 1,)
        )
        valid = jnp.all((indices >= 0) & (indices <= upper), axis=-1)
        batch_axes = tuple(i for i in range(out_ndim) if i not in dnums.offset_dims)
        valid = lax.broadcast_in_dim(valid, update.shape, batch_axes)
        update = jnp.where(valid, update, jnp.zeros((), update.dtype))
    return dense + _cast(update, dense.dtype)


def _scaled(t: Array, scaling: float) -> Array:
    return t if scaling == 1.0 else t * jnp.asarray(scaling, t.dtype)


def _pointwise(t: Array, matrix: Array, axis: int) -> Array:
    """`t` with its feature axis `axis` multiplied by `matrix` (`(features, new)`),
    the new features kept at `axis`."""
    out = lax.dot_general(t, matrix, (((axis,), (0,)), ((), ())))
    n = out.ndim
    return lax.transpose(out, (*range(axis), n - 1, *range(axis, n - 1)))
