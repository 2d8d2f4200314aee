"""The transposed convolution with the matrix-product kernel gradient equals flax's ConvTranspose: the same
variable, the same forward pass, the same gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meme_jax.models.transposed_conv import ConvTranspose, check_impl, conv_transpose


# (kernel, PyTorch padding, output padding) of the original's deconvolutions, and an odd size and stride 3.
@pytest.mark.parametrize("height,width,kernel,stride,padding", [
    (8, 6, 4, 2, ((2, 2), (2, 2))), (7, 5, 3, 2, ((1, 2), (1, 2))), (8, 8, 2, 2, ((1, 1), (1, 1))),
    (5, 7, 4, 3, ((0, 1), (3, 2))), (6, 6, 3, 1, ((2, 2), (0, 0)))])
def test_matches_flax_conv_transpose(height, width, kernel, stride, padding):
  rng = np.random.default_rng(100 * kernel + 10 * stride + height)
  x = jnp.asarray(rng.normal(size=(2, height, width, 5)), jnp.float32)
  ours = ConvTranspose(3, kernel, stride, padding, impl="matmul")
  flax = nn.ConvTranspose(3, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=False,
                          transpose_kernel=True)
  variables = flax.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, variables)
  ref = flax.apply(variables, x)
  np.testing.assert_array_equal(ours.apply(variables, x), ref)
  g = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)

  def grads(module):
    return jax.jit(jax.grad(lambda v, a: jnp.sum(module.apply(v, a) * g), (0, 1)))(variables, x)

  (dv_ref, dx_ref), (dv, dx) = grads(flax), grads(ours)
  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(dv["params"]["kernel"], dv_ref["params"]["kernel"], atol=1e-4, rtol=1e-5)


def test_impls_agree_in_bfloat16():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 4, 3, 4)), jnp.bfloat16)
  pads = ((2, 2), (2, 2))

  def grad(impl):
    return jax.grad(lambda a: jnp.sum(conv_transpose(x, a, 2, pads, impl).astype(jnp.float32)))(w)

  assert grad("matmul").dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(grad("matmul")), np.float32(grad("conv")), rtol=2e-2, atol=2e-2)


def test_rejects_bad_arguments():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match="C_in=3"):
    conv_transpose(x, jnp.zeros((4, 4, 3, 2)), 2, ((2, 2), (2, 2)))
  with pytest.raises(ValueError, match="negative padding"):
    conv_transpose(x, jnp.zeros((4, 4, 2, 3)), 2, ((-1, 2), (2, 2)))
  with pytest.raises(ValueError, match="impl"):
    conv_transpose(x, jnp.zeros((4, 4, 2, 3)), 2, ((2, 2), (2, 2)), impl="fast")


def test_auto_follows_the_compile_target():
  assert check_impl("auto", "cpu") == "matmul"
  assert check_impl("auto", "tpu") == "conv" and check_impl("auto", "gpu") == "conv"
  assert check_impl("conv", "cpu") == "conv"
