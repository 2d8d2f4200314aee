"""Bottom-up training data (data_pipelines.bottomup) on the real COCO / CrowdPose / MPII samples: records, crowd
masks (pycocotools), the bottom-up affine against the top-down one, flips, batches, resume, and a CrowdPose batch that
trains."""
import copy
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pycocotools.coco import COCO

import meme_jax
from configs import dem_common
from data_pipelines import bottomup
from data_pipelines.images import read_image
from data_pipelines.records import BadRecordError
from meme_jax.codecs import affine
from meme_jax.codecs.dem import DEMCodec
from meme_jax.losses.dem import dem_loss
from conftest import shared_path


def config_for(name, annotations, images, input_size=None):
  config = meme_jax.load_config(f"configs/{name}.py")
  if input_size:
    dem_common.tiny(config, input_size=input_size)
  config.data.train_annotations = annotations
  config.data.train_images = images
  return config


@pytest.fixture(scope="module")
def coco_paths():
  return shared_path("data", "samples", "coco", "test_coco.json"), shared_path("data", "samples", "coco")


@pytest.fixture(scope="module")
def crowdpose_paths():
  return (shared_path("data", "samples", "crowdpose", "test_crowdpose.json"),
          shared_path("data", "samples", "crowdpose"))


def test_coco_records_keep_every_person_and_mask_the_unannotated(coco_paths):
  config = config_for("dem_w32_coco", *coco_paths)
  records = {r["image_id"]: r for r in bottomup.load_records(config)}
  with open(coco_paths[0]) as f:
    data = json.load(f)
  for image_id, record in records.items():
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    assert record["keypoints"].shape == (len(anns), 17, 3)
    np.testing.assert_array_equal(record["keypoints"].reshape(len(anns), -1), [a["keypoints"] for a in anns])
    assert len(record["segmentations"]) == sum(a["num_keypoints"] == 0 for a in anns)
  assert sorted(records) == sorted(i["id"] for i in data["images"])


def test_mask_of_a_person_without_keypoints_equals_pycocotools(coco_paths):
  config = config_for("dem_w32_coco", *coco_paths)
  coco = COCO(coco_paths[0])
  for record in bottomup.load_records(config):
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=record["image_id"])) if a["num_keypoints"] == 0]
    expected = np.ones((record["height"], record["width"]), np.float32)
    for ann in anns:
      expected[coco.annToMask(ann) > 0] = 0.0
    mask = bottomup.annotation_mask(record["segmentations"], record["height"], record["width"])
    np.testing.assert_array_equal(mask, expected)
    assert (mask == 0).any() == bool(anns)


def uncompressed_rle(mask):
  """COCO crowd RLE by hand: run lengths of the column-major flattening, starting with a run of zeros."""
  flat = mask.flatten(order="F").astype(np.int64)
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0] == 1:
    runs = [0] + runs
  return {"counts": runs, "size": list(mask.shape)}


def test_crowd_region_is_zero_in_the_target_masks(coco_paths, tmp_path):
  with open(coco_paths[0]) as f:
    data = json.load(f)
  height, width = 425, 640                         # image 785
  region = np.zeros((height, width), np.uint8)
  region[300:400, 150:250] = 1                     # rows 300..399, columns 150..249
  data["annotations"].append(dict(id=1, image_id=785, category_id=1, iscrowd=1, num_keypoints=0,
                                  keypoints=[0] * 51, area=10000.0, bbox=[150, 300, 100, 100],
                                  segmentation=uncompressed_rle(region)))
  ann_file = tmp_path / "with_crowd.json"
  ann_file.write_text(json.dumps(data))
  config = config_for("dem_w32_coco", str(ann_file), coco_paths[1], input_size=128)
  record = next(r for r in bottomup.load_records(config) if r["image_id"] == 785)
  assert record["keypoints"].shape[0] == 1 and len(record["segmentations"]) == 1   # the crowd is no person
  np.testing.assert_array_equal(bottomup.annotation_mask(record["segmentations"], height, width), 1 - region)
  sample = bottomup.BottomUpSample(config, augment=False).random_map(record, np.random.default_rng(0))
  # Without augmentation the centred 425 x 425 square (columns 107.5 ... 532.5) maps onto each output square.
  for i, r in enumerate((32, 64)):
    m = sample[f"masks_{i}"]
    s = r / 425.0
    x0, x1 = math.ceil((150 - 107.5) * s) + 1, math.floor((250 - 107.5) * s) - 1
    y0, y1 = math.ceil(300 * s) + 1, math.floor(400 * s) - 1
    assert np.all(m[y0:y1 + 1, x0:x1 + 1] == 0)
    outside = np.ones_like(m, bool)
    outside[y0 - 3:y1 + 4, x0 - 3:x1 + 4] = False
    assert np.all(m[outside] == 1)


@pytest.mark.parametrize("rotation", [0.0, 23.0, -17.5])
def test_augmentation_affine_equals_the_top_down_affine(rotation):
  center, scale = np.array([301.0, 207.5]), 2.4
  ours = affine.square_crop_matrix(center, scale, 128, rotation)
  reference = affine.get_affine_transform(center, np.array([scale, scale]), rotation, (128, 128))
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def on_map(points, center, scale, r, input_size):
  """Image points -> pixels of an r x r target map: the input warp, then input pixel centres onto map pixel
  centres (a map pixel covers the r / input_size input pixels under it)."""
  matrix = affine.get_affine_transform(np.asarray(center), np.array([scale, scale]), 0, (input_size, input_size))
  return (affine.apply_affine(points, matrix) + 0.5) * r / input_size - 0.5


def test_unaugmented_sample_targets_sit_at_the_mapped_keypoints(coco_paths):
  config = config_for("dem_w32_coco", *coco_paths, input_size=128)
  record = next(r for r in bottomup.load_records(config) if r["image_id"] == 785)
  sample = bottomup.BottomUpSample(config, augment=False).random_map(record, np.random.default_rng(0))
  assert sample["image"].shape == (128, 128, 3) and sample["image"].dtype == np.float32
  kpts = record["keypoints"][0]
  for i, r in enumerate((32, 64)):
    mapped = on_map(kpts[:, :2], [320.0, 212.5], 2.125, r, 128)
    hm = sample[f"heatmaps_{i}"]
    for j in (0, 5, 9, 16):
      x, y = int(mapped[j, 0]), int(mapped[j, 1])
      assert hm[y, x, j] == 1.0, (r, j)
    center = mapped.mean(axis=0)          # all 17 keypoints are labelled
    assert hm[int(center[1]), int(center[0]), 17] == 1.0
  # The image is the centred square of the photo, bilinearly sampled and normalised.
  photo = read_image(record["file"]).astype(np.float64)
  inverse = affine.get_affine_transform(np.array([320.0, 212.5]), np.array([2.125, 2.125]), 0, (128, 128),
                                        inverse=True)
  for u, v in ((64, 64), (10, 100), (120, 7)):
    sx, sy = affine.apply_affine(np.array([u, v], np.float64), inverse)
    x0, y0 = int(np.floor(sx)), int(np.floor(sy))
    fx, fy = sx - x0, sy - y0
    rgb = ((1 - fy) * ((1 - fx) * photo[y0, x0] + fx * photo[y0, x0 + 1])
           + fy * ((1 - fx) * photo[y0 + 1, x0] + fx * photo[y0 + 1, x0 + 1]))
    expected = (rgb / 255.0 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    np.testing.assert_allclose(sample["image"][v, u], expected, atol=0.03)


def test_flip_mirrors_image_masks_and_swaps_joints(coco_paths):
  config = config_for("dem_w32_coco", *coco_paths, input_size=128)
  record = next(r for r in bottomup.load_records(config) if r["image_id"] == 196141)
  plain_cfg, flip_cfg = copy.deepcopy(config), copy.deepcopy(config)
  plain_cfg.data.flip_prob, flip_cfg.data.flip_prob = 0.0, 1.0
  plain = bottomup.BottomUpSample(plain_cfg).random_map(record, np.random.default_rng(7))
  flipped = bottomup.BottomUpSample(flip_cfg).random_map(record, np.random.default_rng(7))
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  for i in (0, 1):
    np.testing.assert_array_equal(flipped[f"masks_{i}"], plain[f"masks_{i}"][:, ::-1])
  assert (plain["masks_1"] == 0).any()        # the unannotated people are masked
  codec = DEMCodec.from_config(config)
  r = 32

  def entries(joints):
    idx = joints[..., 0][joints[..., 1] > 0]
    return list(zip(idx // (r * r), (idx % (r * r)) // r, idx % r))

  got = entries(flipped["joints_0"])
  assert len(got) >= 20
  for k, y, x in entries(plain["joints_0"]):
    # Truncation of r - 1 - x and of x differ by up to one pixel for non-integer x.
    assert any(kf == codec.flip_index[k] and yf == y and abs(xf - (r - 1 - x)) <= 1 for kf, yf, xf in got), (k, y, x)
  # Left shoulder (5) in the mirror is where the right shoulder (6) was.
  peak = lambda hm: np.unravel_index(np.argmax(hm), hm.shape)
  y6, x6 = peak(plain["heatmaps_1"][..., 6])
  y5, x5 = peak(flipped["heatmaps_1"][..., 5])
  assert y5 == y6 and abs(x5 - (63 - x6)) <= 1


@pytest.mark.parametrize("original", [False, True])
def test_flipped_people_sit_where_the_mirrored_image_shows_them(coco_paths, original):
  """A flipped sample's people at every output size are the mirror, in input pixels (x <- S - 1 - x, as the image's
  pixels are reversed), of where the augmentation put the joints, carried to the map's pixel centres. The original's
  frame (map pixel x * r / S, mirrored as r - 1 - x on the map) misses it by 1 - r / S map pixels."""
  config = config_for("dem_w32_coco", *coco_paths, input_size=128)
  config.data.flip_prob = 1.0
  config.data.original_map_frame = original
  codec = DEMCodec.from_config(config)
  record = next(r for r in bottomup.load_records(config) if r["image_id"] == 196141)
  steps = bottomup.train_steps(config, codec)[:3]           # affine, image, people and masks; no targets
  sample = dict(image=read_image(record["file"]), mask=np.ones((record["height"], record["width"]), np.float32),
                people=codec.add_centers(record["keypoints"]))
  for step in steps:
    sample = step(sample, np.random.default_rng(3))
  aff, size = sample["affine"], codec.input_size
  matrix = affine.square_crop_matrix(aff["center"], aff["scale"], size, aff["rotation"])
  on_input = affine.apply_affine(codec.add_centers(record["keypoints"])[..., :2], matrix)
  mirrored = size - 1 - on_input[..., 0]
  labelled = record["keypoints"][:, :, 2] > 0
  for r, people in zip(codec.output_sizes, sample["people_per_resolution"]):
    x = people[:, codec.flip_index, 0][:, :-1]             # back in the unflipped joint order, joints only
    if original:
      expected = r - 1 - on_input[..., 0] * r / size
    else:
      expected = (mirrored + 0.5) * r / size - 0.5
    np.testing.assert_allclose(x[labelled], expected[:, :-1][labelled], atol=1e-9)
  if original:
    # In its own frame the mirrored image shows the joint at (S - 1 - x) * r / S: 0.75 map pixels (3 input pixels)
    # right of the target at r = S / 4.
    gap = mirrored * r / size - expected
    np.testing.assert_allclose(gap[:, :-1][labelled], 1 - r / size, atol=1e-9)


def test_crowdpose_sample_has_36_offset_channels_pointing_at_parents(crowdpose_paths):
  config = config_for("dem_w32_crowdpose", *crowdpose_paths)
  record = next(r for r in bottomup.load_records(config) if r["image_id"] == 103319)
  sample = bottomup.BottomUpSample(config, augment=False).random_map(record, np.random.default_rng(0))
  assert sample["offsets_0"].shape == (128, 128, 36) and sample["offsets_1"].shape == (256, 256, 36)
  assert sample["heatmaps_0"].shape == (128, 128, 15) and sample["joints_0"].shape == (30, 15, 2)
  assert np.all(sample["masks_0"] == 1) and np.all(sample["masks_1"] == 1)   # no segmentations in CrowdPose
  r = 256
  z = math.sqrt(2) * r
  for person in record["keypoints"]:
    mapped = on_map(person[:, :2], [320.0, 240.0], 2.4, r, 512)
    center = mapped[person[:, 2] > 0].mean(axis=0)
    x, y = int(mapped[2, 0]), int(mapped[2, 1])         # left elbow -> left shoulder, channels 0-3
    dy, dx, cy, cx = sample["offsets_1"][y, x, 0:4] * z
    np.testing.assert_allclose([x + dx, y + dy], mapped[0], atol=1e-3)
    np.testing.assert_allclose([x + cx, y + cy], center, atol=1e-3)
    hx, hy = int(mapped[12, 0]), int(mapped[12, 1])     # head -> centre, channels 32-33
    np.testing.assert_allclose(np.array([hx, hy]) + sample["offsets_1"][hy, hx, [33, 32]] * z, center, atol=1e-3)


def test_mpii_records_in_network_order():
  config = config_for("dem_w32_mpii", shared_path("data", "samples", "mpii", "test_mpii.json"),
                      shared_path("data", "samples", "mpii"), input_size=64)
  records = bottomup.load_records(config)
  with open(shared_path("data", "samples", "mpii", "test_mpii.json")) as f:
    entries = json.load(f)
  assert len(records) == len(entries)
  first = next(r for r in records if r["file"].endswith(entries[0]["image"]))
  # Network joint 0 is MPII joint 13 (left shoulder), 1-based in the file.
  np.testing.assert_allclose(first["keypoints"][0, 0, :2], np.array(entries[0]["joints"][13]) - 1)
  sample = bottomup.BottomUpSample(config).random_map(first, np.random.default_rng(1))
  assert sample["offsets_0"].shape == (16, 16, 36) and sample["heatmaps_1"].shape == (32, 32, 17)


def test_bad_keypoints_name_the_record_or_are_skipped(coco_paths, tmp_path):
  with open(coco_paths[0]) as f:
    data = json.load(f)
  data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
  ann_file = tmp_path / "bad.json"
  ann_file.write_text(json.dumps(data))
  config = config_for("dem_w32_coco", str(ann_file), coco_paths[1])
  with pytest.raises(BadRecordError, match=r"bad\.json.*annotation 442619.*'keypoints' has 48 values"):
    bottomup.load_records(config)
  config.data.skip_bad_records = True
  assert sorted(r["image_id"] for r in bottomup.load_records(config)) == [40083, 196141, 197388]


def test_loader_batches_resume_and_repeat(coco_paths):
  config = config_for("dem_w32_coco", *coco_paths, input_size=64)
  loader = bottomup.bottomup_train_loader(config, seed=3, shard_index=0, shard_count=1, batch_size_per_process=2,
                                         num_workers=0)
  make = lambda: iter(loader)
  it = make()
  first = next(it)
  shapes = {k: (v.shape, v.dtype) for k, v in first.items()}
  assert shapes == {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in loader.batch_shapes.items()}
  assert set(shapes) == set(bottomup.BATCH_KEYS) and loader.steps_per_epoch == 2
  assert shapes == {
      "image": ((2, 64, 64, 3), np.float32), "heatmaps_0": ((2, 16, 16, 18), np.float32),
      "heatmaps_1": ((2, 32, 32, 18), np.float32), "masks_0": ((2, 16, 16), np.float32),
      "masks_1": ((2, 32, 32), np.float32), "offsets_0": ((2, 16, 16, 42), np.float32),
      "offsets_1": ((2, 32, 32, 42), np.float32), "joints_0": ((2, 30, 18, 2), np.int32)}
  state = it.get_state()
  later = [next(it) for _ in range(3)]             # 4 images, 2 per batch: this crosses into the next epochs
  resumed = make()
  resumed.set_state(state)
  for batch in later:
    again = next(resumed)
    for key in batch:
      np.testing.assert_array_equal(again[key], batch[key], err_msg=key)
  np.testing.assert_array_equal(next(make())["image"], first["image"])
  with pytest.raises(ValueError, match="shard"):
    bottomup.bottomup_train_loader(config, seed=0, shard_index=2, shard_count=2, batch_size_per_process=1,
                                   num_workers=0)
  # Two processes: each reads half of the images, one step per epoch each.
  halves = [bottomup.bottomup_train_loader(config, seed=0, shard_index=i, shard_count=2, batch_size_per_process=2,
                                           num_workers=0) for i in (0, 1)]
  assert [h.steps_per_epoch for h in halves] == [1, 1]


class SmallDEMNet(nn.Module):
  """A few convolutions with the DEM output contract (four NHWC maps at 1/4 and 1/2 resolution), so this test
  exercises targets and losses without compiling an HRNet."""
  num_points: int
  num_offsets: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(24, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(24, (3, 3))(x))
    quarter = nn.Conv(self.num_offsets + 2 * self.num_points, (3, 3))(x)
    h = nn.relu(nn.ConvTranspose(16, (4, 4), strides=(2, 2))(x))
    half = nn.Conv(self.num_offsets + self.num_points, (3, 3))(h)
    c = self.num_offsets
    return quarter[..., :c], half[..., :c], quarter[..., c:], half[..., c:]


def test_a_crowdpose_batch_trains(crowdpose_paths):
  config = config_for("dem_w32_crowdpose", *crowdpose_paths, input_size=64)
  batch = next(iter(bottomup.bottomup_train_loader(config, seed=0, shard_index=0, shard_count=1,
                                                   batch_size_per_process=2, num_workers=0)))
  assert batch["joints_0"][..., 1].sum() > 10
  model = SmallDEMNet(num_points=15, num_offsets=36)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  loss_fn = jax.jit(lambda outputs, batch: dem_loss(outputs, batch, config))
  # Predicting zeros everywhere is the trivial solution; training must do much better than that.
  zeros = tuple(jnp.zeros(batch[key].shape[:3] + (c,)) for key, c in
                (("offsets_0", 36), ("offsets_1", 36), ("heatmaps_0", 30), ("heatmaps_1", 15)))
  zero_loss = float(loss_fn(zeros, batch)[0])

  @jax.jit
  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, batch["image"]), batch),
                                            has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  losses, pushes = [], []
  for _ in range(150):
    params, opt_state, loss, aux = step(params, opt_state, batch)
    losses.append(loss)
    pushes.append(aux["push_loss"])
  losses, pushes = np.asarray(losses), np.asarray(pushes)
  assert np.all(np.isfinite(losses))
  assert set(aux) == {"heatmaps_loss_0", "heatmaps_loss_1", "offsets_loss_0", "offsets_loss_1", "push_loss",
                      "pull_loss"}
  assert losses[-1] < 0.4 * zero_loss, (losses[-1], zero_loss)
  assert pushes[-1] < 0.5 * pushes[0]         # the two people's tags move apart
