"""Depthwise convolution (one k x k filter per channel), NHWC.

XLA's CPU backend runs `conv_general_dilated(feature_group_count=C)` as a generic grouped convolution that is an
order of magnitude slower than it needs to be (measured on 2 cores, a 5x5 depthwise conv on a 16x16x12x240 map:
65 ms against 2-3 ms; with gradients 270 ms against 35 ms). Written as a sum of k*k shifted slices, each scaled
per channel, it becomes elementwise loops. Its gradients are given explicitly (`custom_vjp`): the input gradient
is the same shift-and-add on the (dilated) output gradient with the flipped kernel, and the kernel gradient is k*k
per-channel sums computed in one pass; plain autodiff would materialise k*k padded copies instead.

Inference computes the sum as one expression, which XLA fuses into a single pass. Training computes it as a loop
over the kernel's rows: a loop's result is a buffer, while the single expression gets copied by XLA's CPU fusion
into every consumer of the output (the BatchNorm statistics, the normalisation, the backward pass: about nine per
convolution in EEffPose), which cost the P0 train step a quarter of its FLOPs and 10-20 % of its time. The loop
alone is 2.5x slower for inference.

`depthwise_conv(..., impl='auto')` uses the shift-and-add on CPU and XLA's convolution (cuDNN) on GPU/TPU, where
the library convolution is the fast path. Both give the same result to float rounding.
"""
import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  """TensorFlow 'SAME' padding of one axis: total max((ceil(n/s)-1)*s + k - n, 0), the odd pixel after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def resolve_padding(padding, height: int, width: int, kernel: int, stride: int) -> Padding:
  if isinstance(padding, str):
    if padding.upper() == "SAME":
      return same_padding(height, kernel, stride), same_padding(width, kernel, stride)
    if padding.upper() == "VALID":
      return (0, 0), (0, 0)
    raise ValueError(f"padding {padding!r}: expected 'SAME', 'VALID' or explicit pairs")
  (top, bottom), (left, right) = padding
  return (int(top), int(bottom)), (int(left), int(right))


def _shift_add(xp, kernel, stride: int, out_h: int, out_w: int):
  """sum_{i,j} xp[:, s*oh + i, s*ow + j, :] * kernel[i, j, :] over a padded input, as one expression."""
  k_h, k_w = kernel.shape[0], kernel.shape[1]
  out = None
  for i in range(k_h):
    for j in range(k_w):
      tap = jax.lax.slice(xp, (0, i, j, 0),
                          (xp.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, xp.shape[3]),
                          (1, stride, stride, 1))
      term = tap * kernel[i, j]
      out = term if out is None else out + term
  return out


def _shift_add_by_rows(xp, kernel, stride: int, out_h: int, out_w: int):
  """`_shift_add` as a loop over the kernel's rows, whose result XLA must keep as a buffer."""
  k_w = kernel.shape[1]
  n, c = xp.shape[0], xp.shape[3]

  def add_row(i, out):
    rows = jax.lax.dynamic_slice_in_dim(xp, i, stride * (out_h - 1) + 1, axis=1)[:, ::stride]
    weights = jax.lax.dynamic_index_in_dim(kernel, i, keepdims=False)
    for j in range(k_w):
      out = out + jax.lax.slice_in_dim(rows, j, j + stride * (out_w - 1) + 1, stride, axis=2) * weights[j]
    return out

  zeros = jnp.zeros((n, out_h, out_w, c), jnp.result_type(xp, kernel))
  return jax.lax.fori_loop(0, kernel.shape[0], add_row, zeros)


def _forward(x, kernel, stride: int, padding: Padding, shift_add):
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  k_h, k_w = kernel.shape[0], kernel.shape[1]
  out_h = (xp.shape[1] - k_h) // stride + 1
  out_w = (xp.shape[2] - k_w) // stride + 1
  return shift_add(xp, kernel, stride, out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, stride: int, padding: Padding):
  return _forward(x, kernel, stride, padding, _shift_add)


def _depthwise_shift_fwd(x, kernel, stride, padding):
  # Under differentiation the output is read by many fusions (the BatchNorm statistics and normalisation, the
  # backward pass); as one expression XLA's CPU fusion would copy the k*k taps into each of them.
  return _forward(x, kernel, stride, padding, _shift_add_by_rows), (x, kernel)


def _depthwise_shift_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  (pt, pb), (pl, pr) = padding
  k_h, k_w = kernel.shape[0], kernel.shape[1]
  n, out_h, out_w, c = g.shape
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  # Kernel gradient: the k*k per-channel sums of tap * g, accumulated in float32 by one variadic reduction over N
  # and H (a single pass over the input and the gradient), then a small sum over W. Separate reductions per tap,
  # as autodiff writes them, cost 7x more on CPU.
  products = []
  for i in range(k_h):
    for j in range(k_w):
      tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                          (1, stride, stride, 1))
      products.append((tap * g).astype(jnp.float32))
  zero = jnp.zeros((), jnp.float32)
  rows = jax.lax.reduce(products, [zero] * len(products), lambda a, b: [u + v for u, v in zip(a, b)], (0, 1))
  d_kernel = jnp.stack(rows).sum(axis=1).reshape(k_h, k_w, c).astype(kernel.dtype)
  # Input gradient: correlate the stride-dilated output gradient with the flipped kernel, then crop the padding.
  dilated = jax.lax.pad(g, jnp.zeros((), g.dtype),
                        ((0, 0, 0), (k_h - 1, k_h - 1, stride - 1), (k_w - 1, k_w - 1, stride - 1), (0, 0, 0)))
  d_xp = _shift_add(dilated, kernel[::-1, ::-1], 1, stride * (out_h - 1) + k_h, stride * (out_w - 1) + k_w)
  # d_xp covers xp rows 0 .. s*(out_h-1)+k_h-1; rows of xp beyond (dropped by the stride) get no gradient.
  d_xp = jnp.pad(d_xp, ((0, 0), (0, xp.shape[1] - d_xp.shape[1]), (0, xp.shape[2] - d_xp.shape[2]), (0, 0)))
  d_x = d_xp[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :]
  return d_x.astype(x.dtype), d_kernel


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_conv(x, kernel, stride: int = 1, padding="SAME", impl: str = "auto"):
  """Depthwise conv of NHWC `x` with an HWIO kernel of shape (k, k, 1, C) (the Flax/converter layout).

  `impl`: 'shift' (fused shift-and-add), 'conv' (XLA convolution) or 'auto' (shift on CPU, conv elsewhere).
  """
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"depthwise kernel must be (k, k, 1, C={x.shape[-1]}), got {kernel.shape}")
  pads = resolve_padding(padding, x.shape[1], x.shape[2], kernel.shape[0], stride)
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "conv"
  if impl == "conv":
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])
  if impl != "shift":
    raise ValueError(f"depthwise impl {impl!r}: expected 'auto', 'shift' or 'conv'")
  return _depthwise_shift(x, kernel[:, :, 0, :], stride, pads)


def check_impl(impl: str, platform: str = "") -> str:
  """The implementation to build with: `impl`, or for 'auto' the one for `platform` ('' = the backend this
  process runs on; `--mode compile` gives the compile target, so compiling for a TPU from a CPU host gets XLA's
  grouped convolution, not the CPU's shift-and-add)."""
  if impl not in ("auto", "shift", "conv"):
    raise ValueError(f"config.model.depthwise_impl={impl!r}: expected 'auto', 'shift' or 'conv'")
  if impl == "auto":
    return "shift" if (platform or jax.default_backend()) == "cpu" else "conv"
  return impl


class DepthwiseConv(nn.Module):
  """A bias-free depthwise conv layer with the parameter layout of `nn.Conv(feature_group_count=C)`.

  The kernel is `kernel` of shape (k, k, 1, C), so checkpoints and the converter see an ordinary grouped conv.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = "SAME"
  impl: str = "auto"
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[-1] != self.features:
      raise ValueError(f"{self.name}: depthwise conv of {self.features} channels got an input of {x.shape[-1]}")
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, self.features),
                        self.param_dtype)
    dtype = self.dtype or x.dtype
    return depthwise_conv(x.astype(dtype), kernel.astype(dtype), self.stride, self.padding, self.impl)


__all__: Sequence[str] = ("depthwise_conv", "DepthwiseConv", "same_padding", "resolve_padding", "check_impl")
