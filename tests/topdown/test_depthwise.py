"""The shift-and-add depthwise convolution equals XLA's grouped convolution, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meme_jax.models.depthwise import depthwise_conv, same_padding


@pytest.mark.parametrize("height,width,kernel,stride,padding", [
    (16, 12, 3, 1, "SAME"), (16, 12, 5, 2, "SAME"), (15, 11, 3, 2, "SAME"), (15, 11, 5, 2, "SAME"),
    (16, 12, 5, 1, ((2, 2), (2, 2))), (17, 13, 3, 2, ((1, 1), (1, 1))), (9, 9, 3, 1, "VALID")])
def test_shift_matches_conv(height, width, kernel, stride, padding):
  rng = np.random.default_rng(kernel * 100 + stride * 10 + height)
  x = jnp.asarray(rng.normal(size=(2, height, width, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  ref = depthwise_conv(x, w, stride, padding, impl="conv")
  out = depthwise_conv(x, w, stride, padding, impl="shift")
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  g = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)

  def grads(impl):
    return jax.grad(lambda a, b: jnp.sum(depthwise_conv(a, b, stride, padding, impl=impl) * g), (0, 1))(x, w)

  (dx_ref, dw_ref), (dx, dw) = grads("conv"), jax.jit(lambda: grads("shift"))()
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, atol=1e-4, rtol=1e-5)


def test_same_padding_is_tensorflow_rule():
  # Even sizes at stride 2: (0, 1) for k=3 and (1, 2) for k=5; stride 1 odd kernels: symmetric k // 2.
  assert same_padding(64, 3, 2) == (0, 1)
  assert same_padding(64, 5, 2) == (1, 2)
  assert same_padding(63, 3, 2) == (1, 1)
  assert same_padding(48, 5, 1) == (2, 2)


def test_rejects_wrong_kernel_shape():
  with pytest.raises(ValueError, match="depthwise kernel"):
    depthwise_conv(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 4)))
