"""Transposed convolution (a convolution of the input dilated by the stride), NHWC, with a fast kernel gradient.

The forward pass is XLA's input-dilated convolution, the same program as `flax.linen.ConvTranspose`. Autodiff
writes its kernel gradient as a convolution of the input with the output gradient, dilated by the stride and with
a window as large as the input (32x32 at the synthetic DEM job's shapes). XLA's CPU backend has no fast path for
that: in the DEM synthetic train step (2 cores, batch 8, 128x128) the two deconvolutions' kernel gradients were
the two longest operations, 170 ms of an 830 ms step. Each kernel tap's gradient is only the product of the
input with one strided slice of the output gradient, so on CPU the k*k taps are computed as a single matrix
product, (N*H*W, C_in) by (N*H*W, k*k*C_out), and the step takes 0.72 s. The input gradient is autodiff's, a
strided convolution, which XLA runs well. (The same product for ordinary convolutions, whose taps are slices of
the input, doubled the step's temporaries and made it slower.)

`impl='auto'` uses that product on CPU and autodiff's convolution on GPU/TPU, where the library's kernel gradient
is the fast path (`check_impl` with the compile target's platform, as `--mode compile` sets it). Both give the
same result to float rounding.
"""
import functools
from typing import Any, Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = Tuple[Tuple[int, int], Tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "matmul", "conv")


def _dilated_conv(x, kernel, stride: int, padding: Padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, lhs_dilation=(stride, stride),
                                      dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dilated_conv_matmul_grad(x, kernel, stride: int, padding: Padding):
  return _dilated_conv(x, kernel, stride, padding)


def _forward(x, kernel, stride, padding):
  return _dilated_conv(x, kernel, stride, padding), (x, kernel)


def _backward(stride, padding, residuals, g):
  x, kernel = residuals
  n, height, width, _ = x.shape
  k_h, k_w = kernel.shape[0], kernel.shape[1]
  out_h, out_w = g.shape[1], g.shape[2]
  (p_top, _), (p_left, _) = padding
  # out[o] = sum_k dilated(x)[o + k - p], so d kernel[k] = sum_i x[i] * g[stride * i - k + p]: for tap k the
  # gradient rows stride * i + p - k, i = 0 .. height-1, zero where they fall outside the output.
  top, left = max(0, k_h - 1 - p_top), max(0, k_w - 1 - p_left)
  bottom = max(0, stride * (height - 1) + p_top - out_h + 1)
  right = max(0, stride * (width - 1) + p_left - out_w + 1)
  gp = jnp.pad(g, ((0, 0), (top, bottom), (left, right), (0, 0)))
  taps = []
  for i in range(k_h):
    for j in range(k_w):
      row, col = p_top + top - i, p_left + left - j
      taps.append(jax.lax.slice(gp, (0, row, col, 0),
                                (n, row + stride * (height - 1) + 1, col + stride * (width - 1) + 1, g.shape[3]),
                                (1, stride, stride, 1)))
  products = jnp.einsum("nhwi,nhwc->ic", x, jnp.concatenate(taps, axis=-1), preferred_element_type=jnp.float32)
  d_kernel = products.reshape(x.shape[3], k_h, k_w, g.shape[3]).transpose(1, 2, 0, 3).astype(kernel.dtype)
  _, input_vjp = jax.vjp(lambda v: _dilated_conv(v, kernel, stride, padding), x)
  (d_x,) = input_vjp(g)
  return d_x, d_kernel


_dilated_conv_matmul_grad.defvjp(_forward, _backward)


def check_impl(impl: str, platform: str = "") -> str:
  """The implementation to build with: `impl`, or for 'auto' the one for `platform` ('' = the backend this
  process runs on; `--mode compile` gives the compile target's, so a TPU program gets autodiff's convolution)."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    return "matmul" if (platform or jax.default_backend()) == "cpu" else "conv"
  return impl


def conv_transpose(x, kernel, stride: int, padding: Padding, impl: str = "auto"):
  """`lax.conv_transpose(x, kernel, (stride, stride), padding, transpose_kernel=True)` of NHWC `x`.

  `kernel` has the layout (k, k, C_out, C_in), PyTorch's ConvTranspose2d weight after the converter's transpose.
  `padding` is the explicit ((low, high), (low, high)) padding of the dilated input.
  """
  impl = check_impl(impl)
  if kernel.ndim != 4 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"transposed-convolution kernel must be (k, k, C_out, C_in={x.shape[-1]}), got {kernel.shape}")
  if any(p < 0 for pair in padding for p in pair):
    raise ValueError(f"padding {padding}: negative padding is not supported")
  # The transposed kernel: spatially flipped, input and output channels swapped (what transpose_kernel=True does).
  kernel = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)
  if impl == "conv":
    return _dilated_conv(x, kernel, stride, padding)
  return _dilated_conv_matmul_grad(x, kernel, stride, padding)


class ConvTranspose(nn.Module):
  """`flax.linen.ConvTranspose(features, (k, k), strides=(s, s), padding, use_bias=False, transpose_kernel=True)`:
  the same variable ('kernel', (k, k, features, C_in)) and forward pass, with `conv_transpose`'s kernel gradient."""
  features: int
  kernel_size: int
  stride: int
  padding: Padding
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, self.features, x.shape[-1]), self.param_dtype)
    return conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.impl)
