"""A drop-in `flax.linen.Conv` whose 3x3 stride-1 SAME convolutions run as Winograd
F(2x2, 3x3) or im2col matrix products (`plan` says which). Why: XLA:CPU's convolution
falls off a cliff on small maps (VGG-CIFAR's last blocks are 2x2) and elsewhere runs well
below the machine's matrix-product rate, its kernel gradient at half its forward speed
(experiments/RESULTS.md, "Speed", CPU).

Winograd F(2x2, 3x3) (Lavin & Gray 2015) is 16 batched matrix products with 4 instead of
9 multiplies per output, plus cheap transforms; its custom VJP reuses the forward's
transformed tiles and kernel. Every path is tested against `lax.conv_general_dilated`,
forward and both gradients (tests/test_cpu.py)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How each part of a convolution is computed: 'xla' or 'im2col', or WINOGRAD."""

    forward: str
    input_grad: str
    kernel_grad: str


# Winograd is all or nothing: its backward reuses the forward's transforms.
WINOGRAD = Plan("winograd", "winograd", "winograd")


def plan(height: int, width: int, in_channels: int) -> Plan:
    """The plan for a 3x3 stride-1 SAME convolution on (height, width, in_channels) maps:
    im2col below 4x4 maps (where XLA:CPU is pathologically slow), im2col forward and
    kernel gradient for an RGB stem (one product with K = 9 * Cin), Winograd otherwise."""
    if min(height, width) < 4:
        return Plan("im2col", "im2col", "im2col")
    if in_channels < 16:
        return Plan("im2col", "xla", "im2col")
    return WINOGRAD


def _live_taps(x: jax.Array, kh: int, kw: int) -> list[tuple[int, int]]:
    """Kernel offsets (i, j) that touch at least one real (non-padding) pixel of `x`."""
    rows = [i for i in range(kh) if abs(i - kh // 2) < x.shape[1]]
    return [(i, j) for i in rows for j in range(kw) if abs(j - kw // 2) < x.shape[2]]


def _patches(x: jax.Array, taps: list[tuple[int, int]], kh: int, kw: int) -> jax.Array:
    """im2col: (N*H*W, len(taps)*Cin), tap-major like the rows of the flattened kernel."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    columns = [lax.slice(padded, (0, i, j, 0), (n, i + h, j + w, c)) for i, j in taps]
    return jnp.concatenate(columns, axis=-1).reshape(n * h * w, len(taps) * c)


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMENSIONS)


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw, _, c_out = kernel.shape
    taps = _live_taps(x, kh, kw)
    kernel_rows = jnp.concatenate([kernel[i, j] for i, j in taps], axis=0)
    return (_patches(x, taps, kh, kw) @ kernel_rows).reshape(*x.shape[:3], c_out)


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", 2015): each 2x2 output tile is A^T [(G k G^T) * (B^T d B)] A for the 4x4
# input tile d around it, so a 3x3 convolution becomes 16 matrix products (one per
# position in the 4x4 transformed tile) with 4 instead of 9 multiplies per output and
# input channel. B, G, A hold only 0, +-1 and +-1/2: the transforms are exact up to
# float rounding (relative error ~1e-6 in float32, like XLA's own convolution).
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_TILE, _STEP = 4, 2  # input tile size, output tile size (= tile stride)


# The dx convolution uses the kernel flipped in space; G's first and last rows are each
# other's mirror images and its middle rows are symmetric, so the flipped kernel's
# transform is the kernel's with tile positions 0 and 3 swapped (per axis). The
# backward pass therefore reuses G k G^T and permutes B^T's rows and A^T's columns.
_MIRROR = np.array([3, 1, 2, 0])


def _tile_grid(shape: Sequence[int]) -> tuple[int, int]:
    """2x2 output tiles down and across an NHWC `shape` (the last ones may overhang)."""
    return -(-shape[1] // _STEP), -(-shape[2] // _STEP)


def _column(values: np.ndarray, axis: int, ndim: int, dtype) -> jax.Array:
    """A vector of transform coefficients shaped to broadcast along `axis`."""
    shape = [1] * ndim
    shape[axis] = len(values)
    return jnp.asarray(values.reshape(shape), dtype)


def _sandwich(matrix: np.ndarray, array: jax.Array) -> jax.Array:
    """matrix @ array @ matrix^T over the two leading axes (the kernel transforms).

    Written as broadcast multiply-adds: as an einsum, XLA:CPU made it matrix products
    with K=3 plus transposes, ~25 ms per 512x512 kernel."""
    ndim = array.ndim
    rows = sum(
        _column(matrix[:, i], 0, ndim, array.dtype) * array[i][None] for i in range(matrix.shape[1])
    )
    return sum(
        _column(matrix[:, j], 1, ndim, array.dtype) * rows[:, j][:, None]
        for j in range(matrix.shape[1])
    )


def _winograd_input(x: jax.Array, bt: np.ndarray = _WINOGRAD_BT) -> jax.Array:
    """B^T d B for every 4x4 input tile: (16, tiles, C), tile position major.

    Separable: rows first, then columns, each a sum of strided slices times a broadcast
    column of B^T. (Stacking the 16 outputs instead made XLA:CPU's fusion ~3x slower.)
    """
    n, h, w, c = x.shape
    tiles_h, tiles_w = _tile_grid(x.shape)
    padded = jnp.pad(
        x, ((0, 0), (1, tiles_h * _STEP - h + 1), (1, tiles_w * _STEP - w + 1), (0, 0))
    )
    rows = sum(
        _column(bt[:, a], 0, 5, x.dtype)
        * lax.slice_in_dim(padded, a, a + (tiles_h - 1) * _STEP + 1, _STEP, axis=1)[None]
        for a in range(_TILE)
    )
    # Materialise the row transform once rather than recompute it for each column.
    rows = lax.optimization_barrier(rows)
    tiles = sum(
        _column(bt[:, b], 1, 6, x.dtype)
        * lax.slice_in_dim(rows, b, b + (tiles_w - 1) * _STEP + 1, _STEP, axis=3)[:, None]
        for b in range(_TILE)
    )
    return tiles.reshape(_TILE * _TILE, n * tiles_h * tiles_w, c)


def _winograd_output(
    products: jax.Array, shape: tuple[int, ...], at: np.ndarray = _WINOGRAD_AT
) -> jax.Array:
    """A^T M A for every tile, laid out as the (N, H, W, C) image of `shape`."""
    n, h, w = shape[:3]
    tiles_h, tiles_w = _tile_grid(shape)
    products = products.reshape(_TILE, _TILE, n, tiles_h, tiles_w, -1)
    # Columns first, straight into the interleaved output layout, then rows.
    columns = sum(
        _column(at[:, nu], 4, 6, products.dtype) * products[:, nu][:, :, :, :, None, :]
        for nu in range(_TILE)
    ).reshape(_TILE, n, tiles_h, tiles_w * _STEP, -1)
    out = sum(
        _column(at[:, xi], 2, 5, products.dtype) * columns[xi][:, :, None] for xi in range(_TILE)
    )
    return out.reshape(n, tiles_h * _STEP, tiles_w * _STEP, -1)[:, :h, :w]


def _winograd_output_grad(dy: jax.Array) -> jax.Array:
    """The transpose of the output transform applied to dy: (16, tiles, Cout)."""
    n, h, w, c = dy.shape
    tiles_h, tiles_w = _tile_grid(dy.shape)
    padded = jnp.pad(dy, ((0, 0), (0, tiles_h * _STEP - h), (0, tiles_w * _STEP - w), (0, 0)))
    blocks = padded.reshape(n, tiles_h, _STEP, tiles_w, _STEP, c)
    columns = sum(
        _column(_WINOGRAD_AT[j], 0, 6, dy.dtype) * blocks[None, :, :, :, :, j] for j in range(_STEP)
    )
    grads = sum(
        _column(_WINOGRAD_AT[i], 0, 6, dy.dtype) * columns[None, :, :, :, i] for i in range(_STEP)
    )
    return grads.reshape(_TILE * _TILE, n * tiles_h * tiles_w, c)


def _winograd_forward(x: jax.Array, kernel: jax.Array):
    x = lax.optimization_barrier(x)  # see _planned_fwd
    tiles = _winograd_input(x)
    transformed = _sandwich(_WINOGRAD_G, kernel).reshape(_TILE * _TILE, *kernel.shape[2:])
    # One matrix product per tile position t: (tiles, Cin) @ (Cin, Cout).
    products = jnp.einsum("tpc,tco->tpo", tiles, transformed)
    return _winograd_output(products, x.shape), (tiles, transformed)


def _winograd_backward(residuals, dy: jax.Array):
    tiles, transformed = residuals
    dy = lax.optimization_barrier(dy)
    # dx: the flipped, transposed kernel's products, via the mirrored transforms.
    dy_tiles = _winograd_input(dy, _WINOGRAD_BT[_MIRROR])
    dx_products = jnp.einsum("tpo,tco->tpc", dy_tiles, transformed)
    dx = _winograd_output(dx_products, dy.shape, _WINOGRAD_AT[:, _MIRROR])
    # dk: G^T [sum over tiles of V^T dM] G, with dM the output transform's transpose of dy.
    dk_products = jnp.einsum("tpc,tpo->tco", tiles, _winograd_output_grad(dy))
    dk = _sandwich(_WINOGRAD_G.T, dk_products.reshape(_TILE, _TILE, *dk_products.shape[1:]))
    return dx, dk


@jax.custom_vjp
def _winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Winograd F(2x2, 3x3) SAME convolution; its backward reuses the forward's
    transformed input tiles and kernel."""
    return _winograd_forward(x, kernel)[0]


_winograd_conv.defvjp(_winograd_forward, _winograd_backward)


def _kernel_grad(x: jax.Array, dy: jax.Array, kh: int, kw: int, how: str) -> jax.Array:
    c_in, c_out = x.shape[-1], dy.shape[-1]
    if how == "xla":
        _, vjp = jax.vjp(lambda k: _xla_conv(x, k), jnp.zeros((kh, kw, c_in, c_out), x.dtype))
        return vjp(dy)[0]
    taps = _live_taps(x, kh, kw)
    rows = _patches(x, taps, kh, kw).T @ dy.reshape(-1, c_out)
    rows = rows.reshape(len(taps), c_in, c_out)
    if len(taps) == kh * kw:
        return rows.reshape(kh, kw, c_in, c_out)
    # Taps that only see padding get a zero gradient.
    grad = jnp.zeros((kh, kw, c_in, c_out), rows.dtype)
    for index, (i, j) in enumerate(taps):
        grad = grad.at[i, j].set(rows[index])
    return grad


_FORWARD = {"xla": _xla_conv, "im2col": _im2col_conv}


def _planned_conv(x: jax.Array, kernel: jax.Array, how: Plan) -> jax.Array:
    if how == WINOGRAD:
        return _winograd_conv(x, kernel)
    return _parts_conv(x, kernel, how)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _parts_conv(x: jax.Array, kernel: jax.Array, how: Plan) -> jax.Array:
    return _planned_fwd(x, kernel, how)[0]


def _planned_fwd(x, kernel, how):
    # Materialise the input once: otherwise XLA fuses its producers (BN, ReLU, dropout's
    # random bits) into each of the nine shifted slices and recomputes them per tap.
    x = lax.optimization_barrier(x)
    return _FORWARD[how.forward](x, kernel), (x, kernel)


def _planned_bwd(how, residuals, dy):
    x, kernel = residuals
    dy = lax.optimization_barrier(dy)
    kh, kw = kernel.shape[:2]
    # The input gradient is the convolution of dy with the kernel flipped in space, its
    # in/out channels swapped (SAME, odd k).
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    dx = _FORWARD[how.input_grad](dy, flipped).astype(x.dtype)
    dk = _kernel_grad(x, dy, kh, kw, how.kernel_grad).astype(kernel.dtype)
    return dx, dk


_parts_conv.defvjp(_planned_fwd, _planned_bwd)


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 SAME convolution of NHWC `x` with an HWIO `kernel`, planned for 3x3."""
    if kernel.shape[:2] != (3, 3):
        return _xla_conv(x, kernel)
    return _planned_conv(x, kernel, plan(x.shape[1], x.shape[2], x.shape[3]))


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv(nn.Module):
    """nn.Conv for 2-D NHWC inputs (the arguments VGG uses, plus strides, precision and
    initialisers), with the same parameters, so checkpoints are interchangeable; only
    stride-1 SAME convolutions go through `conv_same`."""

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel_shape = (*_as_pair(self.kernel_size), inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _as_pair(self.strides)
        if strides == (1, 1) and self.padding == "SAME" and self.precision is None:
            y = conv_same(inputs, kernel)
        else:
            y = lax.conv_general_dilated(
                inputs,
                kernel,
                strides,
                self.padding,
                dimension_numbers=_DIMENSIONS,
                precision=self.precision,
            )
        return y if bias is None else y + bias
