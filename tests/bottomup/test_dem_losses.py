"""DEM losses (meme_jax.losses.dem) against hand-computed values and torch's smooth_l1_loss."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from meme_jax.losses import dem as dem_losses


def test_heatmap_loss_masked_with_centre_weight_by_hand():
  pred = np.zeros((2, 2, 2, 3), np.float32)
  gt = np.zeros_like(pred)
  mask = np.ones((2, 2, 2), np.float32)
  pred[0, 0, 0, 2] = 1.0            # centre channel: weight 5
  pred[0, 1, 1, 0] = 2.0            # joint channel: weight 1
  gt[0, 1, 0, 1] = 0.5
  mask[0, 1, 0] = 0.0               # masks the 0.5 error
  pred[1, 0, 1, 1] = -3.0
  loss = dem_losses.heatmap_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(loss), [(5 * 1 + 4) / 12, 9 / 12], rtol=1e-6)
  loss = dem_losses.heatmap_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask), center_weight=1.0)
  np.testing.assert_allclose(np.asarray(loss), [5 / 12, 9 / 12], rtol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_smooth_l1_matches_torch(beta):
  rng = np.random.default_rng(0)
  pred = rng.normal(scale=2.0, size=(2, 5, 4, 6)).astype(np.float32)
  gt = rng.normal(scale=2.0, size=pred.shape).astype(np.float32)
  mask = (rng.uniform(size=pred.shape[:3]) > 0.3).astype(np.float32)
  ours = dem_losses.offset_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(mask), beta=beta)
  m = torch.from_numpy(mask)[..., None]
  ref = torch.nn.functional.smooth_l1_loss(torch.from_numpy(pred) * m, torch.from_numpy(gt) * m, beta=beta)
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
  elementwise = torch.nn.functional.smooth_l1_loss(torch.from_numpy(pred), torch.from_numpy(gt), beta=beta,
                                                   reduction="none")
  np.testing.assert_allclose(np.asarray(dem_losses.smooth_l1(jnp.asarray(pred), jnp.asarray(gt), beta)),
                             elementwise.numpy(), rtol=1e-6, atol=1e-7)


def tag_batch(people_tags, size=4, num_points=3, max_people=30):
  """Tag maps and AE index lists with person n's i-th tag at a distinct pixel of point type i % num_points."""
  tags = np.zeros((1, size, size, num_points), np.float32)
  joints = np.zeros((1, max_people, num_points, 2), np.int32)
  pixel = 0
  for n, values in enumerate(people_tags):
    for i, value in enumerate(values):
      k = i % num_points
      y, x = divmod(pixel, size)
      pixel += 1
      tags[0, y, x, k] = value
      joints[0, n, i] = (k * size * size + y * size + x, 1)
  return jnp.asarray(tags), jnp.asarray(joints)


@pytest.mark.parametrize("people, push, pull", [
    ([], 0.0, 0.0),
    ([[1.0, 3.0]], 0.0, 1.0),                                        # one person: push 0, not NaN
    ([[0.0], [1.0]], math.exp(-1) / 2, 0.0),                         # 2 exp(-1) / (2 * 2 * 1)
    ([[0.0, 0.0], [1.0, 2.0], [3.0]], (math.exp(-2.25) + math.exp(-9) + math.exp(-2.25)) / 6, 0.25 / 3),
])
def test_ae_push_pull_by_hand(people, push, pull):
  tags, joints = tag_batch(people)
  got_push, got_pull = jax.jit(dem_losses.ae_loss)(tags, joints)
  np.testing.assert_allclose(float(got_push[0]), push, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(float(got_pull[0]), pull, rtol=1e-6, atol=1e-8)


def test_ae_max_type_by_hand():
  tags, joints = tag_batch([[0.0], [0.5], [3.0]])
  push, _ = jax.jit(lambda t, j: dem_losses.ae_loss(t, j, loss_type="max"))(tags, joints)
  # Pairs: |0 - 0.5| -> 0.5, the others are farther than 1 -> 0; each pair counted twice, / (2 * 3 * 2).
  np.testing.assert_allclose(float(push[0]), 2 * 0.5 / 12, rtol=1e-6)
  with pytest.raises(ValueError, match="ae loss type"):
    dem_losses.ae_loss(tags, joints, loss_type="hinge")


def original_ae_loop(tags_nchw, joints):
  """The original's per-image push/pull loop, in torch, for comparison on random data with >= 2 people."""
  flat = tags_nchw.reshape(tags_nchw.shape[0], -1)
  pushes, pulls = [], []
  for b in range(flat.shape[0]):
    means, pull = [], 0.0
    for person in joints[b]:
      vals = [flat[b, idx] for idx, ok in person if ok > 0]
      if not vals:
        continue
      vals = torch.stack(vals)
      means.append(vals.mean())
      pull = pull + ((vals - means[-1]) ** 2).mean()
    n = len(means)
    means = torch.stack(means)
    diff = means[None, :] - means[:, None]
    pushes.append((torch.exp(-diff ** 2).sum() - n) / ((n - 1) * n) * 0.5)
    pulls.append(pull / n)
  return torch.stack(pushes), torch.stack(pulls)


def test_ae_loss_matches_the_original_loop_on_random_batches():
  rng = np.random.default_rng(1)
  b, h, w, k, p = 3, 6, 6, 4, 5
  tags = rng.normal(size=(b, h, w, k)).astype(np.float32)
  joints = np.zeros((b, p, k, 2), np.int32)
  for i in range(b):
    for n in range(2 + i):           # 2, 3, 4 people
      m = rng.integers(1, k + 1)
      joints[i, n, :m, 0] = rng.integers(0, k * h * w, size=m)
      joints[i, n, :m, 1] = 1
  push, pull = jax.jit(dem_losses.ae_loss)(jnp.asarray(tags), jnp.asarray(joints))
  ref_push, ref_pull = original_ae_loop(torch.from_numpy(tags).permute(0, 3, 1, 2), joints)
  np.testing.assert_allclose(np.asarray(push), ref_push.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(pull), ref_pull.numpy(), rtol=1e-5)


def test_ae_gradients_are_finite_for_zero_and_one_person():
  for people in ([], [[1.0, 3.0]]):
    tags, joints = tag_batch(people)
    grad = jax.jit(jax.grad(lambda t: sum(x.sum() for x in dem_losses.ae_loss(t, joints))))(tags)
    assert np.all(np.isfinite(np.asarray(grad)))
  tags, joints = tag_batch([[1.0, 3.0]])
  grad = np.asarray(jax.jit(jax.grad(lambda t: dem_losses.ae_loss(t, joints)[1].sum()))(tags))
  # d pull / d t = 2 (t - mean) / 2 = t - mean: -1 and +1.
  assert sorted(grad[grad != 0].tolist()) == [-1.0, 1.0]


def loss_config(**overrides):
  loss = ml_collections.ConfigDict(dict(
      heatmaps_loss_factor=(1.0, 0.5), offsets_loss_factor=(2.0, 3.0), push_loss_factor=(0.1, 0.001),
      pull_loss_factor=(0.01, 0.001), with_heatmaps_loss=(True, True), with_ae_loss=(True, False),
      ae_loss_type="exp", center_heatmap_weight=5.0))
  loss.update(overrides)
  return ml_collections.ConfigDict(dict(loss=loss))


def random_outputs_and_batch(seed=0, b=2, r=4, k=3, c=6):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  outputs = (f(b, r, r, c), f(b, 2 * r, 2 * r, c), f(b, r, r, 2 * k), f(b, 2 * r, 2 * r, k))
  joints = np.zeros((b, 30, k, 2), np.int32)
  joints[:, 0, :2] = [(1, 1), (k * r * r - 1, 1)]
  joints[:, 1, 0] = (r * r + 5, 1)
  batch = dict(heatmaps_0=f(b, r, r, k), heatmaps_1=f(b, 2 * r, 2 * r, k),
               masks_0=jnp.asarray((rng.uniform(size=(b, r, r)) > 0.2).astype(np.float32)),
               masks_1=jnp.asarray((rng.uniform(size=(b, 2 * r, 2 * r)) > 0.2).astype(np.float32)),
               offsets_0=f(b, r, r, c), offsets_1=f(b, 2 * r, 2 * r, c), joints_0=jnp.asarray(joints))
  return outputs, batch


def test_dem_loss_sums_the_weighted_terms_and_jits():
  outputs, batch = random_outputs_and_batch()
  config = loss_config()
  loss, aux = jax.jit(lambda o, b: dem_losses.dem_loss(o, b, config))(outputs, batch)
  k = 3

  @jax.jit
  def terms(outputs, batch):
    hm0 = jnp.mean(dem_losses.heatmap_loss(outputs[2][..., :k], batch["heatmaps_0"], batch["masks_0"]))
    hm1 = jnp.mean(dem_losses.heatmap_loss(outputs[3], batch["heatmaps_1"], batch["masks_1"]))
    off0 = dem_losses.offset_loss(outputs[0], batch["offsets_0"], batch["masks_0"])
    off1 = dem_losses.offset_loss(outputs[1], batch["offsets_1"], batch["masks_1"])
    return (hm0, hm1, off0, off1) + dem_losses.ae_loss(outputs[2][..., k:], batch["joints_0"])

  hm0, hm1, off0, off1, push, pull = terms(outputs, batch)
  expected = dict(heatmaps_loss_0=hm0, heatmaps_loss_1=0.5 * hm1, offsets_loss_0=2 * off0, offsets_loss_1=3 * off1,
                  push_loss=0.1 * push.mean(), pull_loss=0.01 * pull.mean())
  assert set(aux) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(aux[name]), float(value), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(loss), sum(float(v) for v in expected.values()), rtol=1e-5)
  assert float(expected["push_loss"]) > 0 and float(expected["pull_loss"]) > 0


def test_dem_loss_stage_gates():
  outputs, batch = random_outputs_and_batch(seed=3)
  config = loss_config(with_heatmaps_loss=(True, False), with_ae_loss=(False, False))
  loss, aux = jax.jit(lambda o, b: dem_losses.dem_loss(o, b, config))(outputs, batch)
  assert set(aux) == set(dem_losses.LOSS_TERMS)
  assert all(float(aux[k]) == 0 for k in ("heatmaps_loss_1", "offsets_loss_1", "push_loss", "pull_loss"))
  assert float(aux["heatmaps_loss_0"]) > 0 and float(aux["offsets_loss_0"]) > 0
  np.testing.assert_allclose(float(loss), float(aux["heatmaps_loss_0"] + aux["offsets_loss_0"]), rtol=1e-6)


def test_train_metrics_average_the_terms():
  outputs, batch = random_outputs_and_batch(seed=5)
  config = loss_config()
  fn = jax.jit(lambda o, b: dem_losses.dem_loss_and_metrics(o, b, config))
  loss_a, metrics_a = fn(outputs, batch)
  outputs_b, _ = random_outputs_and_batch(seed=6)
  loss_b, metrics_b = fn(outputs_b, batch)
  values = metrics_a.merge(metrics_b).compute()
  np.testing.assert_allclose(float(values["loss"]), (float(loss_a) + float(loss_b)) / 2, rtol=1e-6)
  loss_fn = jax.jit(lambda o, b: dem_losses.dem_loss(o, b, config))
  _, aux_a = loss_fn(outputs, batch)
  _, aux_b = loss_fn(outputs_b, batch)
  for name in dem_losses.LOSS_TERMS:
    np.testing.assert_allclose(float(values[name]), (float(aux_a[name]) + float(aux_b[name])) / 2, rtol=1e-5)


def test_dem_loss_gradient_is_finite_for_single_person_images():
  outputs, batch = random_outputs_and_batch(seed=4)
  joints = np.zeros(batch["joints_0"].shape, np.int32)
  joints[:, 0, 0] = (3, 1)           # every image: exactly one tagged person
  batch["joints_0"] = jnp.asarray(joints)
  config = loss_config()
  grads = jax.jit(jax.grad(lambda o: dem_losses.dem_loss(o, batch, config)[0]))(outputs)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_dem_loss_rejects_wrong_tag_channels():
  outputs, batch = random_outputs_and_batch()
  bad = (outputs[0], outputs[1], outputs[2][..., :5], outputs[3])
  with pytest.raises(ValueError, match="heatmaps then tags"):
    dem_losses.dem_loss(bad, batch, loss_config())
