"""The real DEM network (the reference's tiny HRNet at 64x64, with the recipe of configs/dem_w32_coco.py:synthetic)
trained through the shared trainer on the built-in synthetic people: the loss falls well below that of predicting nothing, and on held-out
images the heatmap peaks sit on the people.

"Finds a person" is judged against the annotations alone: in each heatmap channel, take as many peaks as the image
has people labelled at that point (greedy, peaks at least 3 map pixels apart) and count a person found when a peak
lies within a fifth of the person's height of the labelled point (the joint, or for the centre channel the mean of
the labelled joints, the codec's centre). The same maps matched against another image's people are the control: it
shows that the peaks follow the people in the image and not where people usually stand.

The grouped poses are judged by pycocotools' own OKS between each labelled person and the best predicted person of
the image (`COCOeval.computeOks`), with the poses of another image as the control.
"""
import contextlib
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import meme_jax
from configs import dem_common
from data_pipelines import bottomup as bottomup_data
from data_pipelines.images import read_image
from meme_jax import predict, train
from meme_jax.bottomup import inference as bottomup
from meme_jax.bottomup import evaluation
from meme_jax.bottomup import scenes
from meme_jax.codecs.dem import DEMCodec
from meme_jax.losses.dem import dem_loss

STEPS = 400
OKS_MEDIAN = 0.15  # measured 0.23 (another image's poses: 0.04)


def synthetic_config(root: str):
  config = meme_jax.load_config("configs/dem_w32_coco.py:synthetic")
  dem_common.tiny(config, input_size=64)
  config.data.root = root
  config.data.synthetic_train_images = 256
  config.data.synthetic_val_images = 32
  config.data.train_annotations = os.path.join(root, "annotations", "train.json")
  config.data.val_annotations = os.path.join(root, "annotations", "val.json")
  config.data.train_images = os.path.join(root, "images", "train")
  config.data.val_images = os.path.join(root, "images", "val")
  config.data.num_workers = 0
  config.train.steps_per_epoch = STEPS // 2
  config.train.num_epochs = 2
  config.train.eval_every_epochs = 2
  config.train.log_every_steps = 100
  config.train.keep_checkpoints = 1
  config.train.async_checkpoints = False
  return config


def peaks(heatmap: np.ndarray, count: int, min_distance: int = 3) -> np.ndarray:
  """Up to `count` local maxima (x, y) of a 2-D map, strongest first, no two within `min_distance` pixels (bilinear
  up-sampling leaves 2x2 plateaus, which would otherwise count as several peaks)."""
  pooled = np.asarray(jax.lax.reduce_window(jnp.asarray(heatmap), -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME"))
  ys, xs = np.nonzero((heatmap == pooled) & (heatmap > 0))
  chosen = []
  for i in np.argsort(-heatmap[ys, xs], kind="stable"):
    if all(max(abs(xs[i] - xs[j]), abs(ys[i] - ys[j])) >= min_distance for j in chosen):
      chosen.append(i)
      if len(chosen) == count:
        break
  return np.stack([xs[chosen], ys[chosen]], axis=-1).astype(np.float64).reshape(-1, 2)


def found_fraction(maps_per_image, people_per_image):
  """(fraction of people whose centre was found, fraction of labelled joints found) over all images."""
  found = {"centre": [], "joints": []}
  for maps, people in zip(maps_per_image, people_per_image):
    heat = np.asarray(maps.heatmaps)
    people = [p for p in people if (p[:, 2] > 0).sum() >= 4]
    for k in range(heat.shape[-1]):
      centre = k == heat.shape[-1] - 1
      targets = [(p, p[p[:, 2] > 0, :2].mean(axis=0) if centre else p[k, :2]) for p in people
                 if centre or p[k, 2] > 0]
      if not targets:
        continue
      xy = bottomup.back_project(peaks(heat[..., k], len(targets)), maps.center, maps.scale, maps.base_size)
      for person, point in targets:
        height = max(np.ptp(person[person[:, 2] > 0, 1]), 20.0)
        hit = len(xy) > 0 and np.min(np.linalg.norm(xy - point, axis=1)) < 0.2 * height
        found["centre" if centre else "joints"].append(hit)
  return float(np.mean(found["centre"])), float(np.mean(found["joints"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  workdir = str(tmp_path_factory.mktemp("dem_run"))
  config = synthetic_config(root)
  summary = train.train_and_evaluate(config, workdir)
  variables = predict.load_checkpoint(os.path.join(workdir, "checkpoints", str(STEPS)), config)
  return config, summary, variables


def test_the_loss_falls_well_below_predicting_nothing(trained):
  config, summary, variables = trained
  assert summary["step"] == STEPS and summary["skipped_steps"] == 0
  batch = next(iter(bottomup_data.bottomup_train_loader(config, seed=1, shard_index=0, shard_count=1,
                                                        batch_size_per_process=16, num_workers=0)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  outputs = predict.build_apply_fn(config)(variables, batch["image"])
  loss, terms = dem_loss(outputs, batch, config)
  zero_loss, zero_terms = dem_loss(tuple(jnp.zeros_like(o) for o in outputs), batch, config)
  # Predicting zeros everywhere is where an untrained net with the N(0, 0.001) init starts.
  assert float(loss) < 0.6 * float(zero_loss), (terms, zero_terms)
  for name in ("heatmaps_loss_0", "heatmaps_loss_1"):
    assert float(terms[name]) < 0.7 * float(zero_terms[name]), (name, terms, zero_terms)


def test_heatmaps_find_the_people_in_held_out_images(trained):
  config, summary, variables = trained
  assert "AP" in summary["stats"]       # the trainer's own COCO evaluation ran on the same images
  records = bottomup_data.load_image_records(config)
  runner = bottomup.BottomUp(config, predict.build_apply_fn(config), variables)
  maps = [runner.maps(read_image(r["file"])) for r in records]
  people = [r["keypoints"] for r in records]

  # The measure itself: the codec's ideal outputs for the same images find everyone.
  codec = DEMCodec.from_config(config)
  ideal = []
  for r in records:
    hw = (int(r["height"]), int(r["width"]))
    ideal.append(runner.maps_from_outputs(scenes.scene_outputs(codec, r["keypoints"], hw, runner.options), hw))
  assert found_fraction(ideal, people) == (1.0, 1.0)

  centres, joints = found_fraction(maps, people)
  shifted_centres, shifted_joints = found_fraction(maps, people[1:] + people[:1])   # another image's people
  print(f"found: centres {centres:.3f}, joints {joints:.3f}; against another image's people: "
        f"{shifted_centres:.3f}, {shifted_joints:.3f}")
  # Measured 0.83 (centres) and 0.58 (joints) with this recipe, 0.25 and 0.21 against another image's people;
  # 0.59-0.80 and 0.53-0.59 with the earlier one (smaller markers, 'exp' push loss), 0.0 and 0.02 untrained.
  assert centres >= 0.4 and joints >= 0.3, (centres, joints)
  assert centres >= 2 * shifted_centres and joints >= 2 * shifted_joints, \
      (centres, joints, shifted_centres, shifted_joints)


def best_oks(config, records, predictions, workdir):
  """For each labelled person (4 or more labelled joints) of the records' images: pycocotools' OKS with the best
  of the predicted persons of its image (0 when the image has none)."""
  files = evaluation.evaluate_predictions(config, records, predictions, workdir=workdir, name="oks")
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(config.data.val_annotations)
    dt = gt.loadRes(files["results_file"]) if predictions and any(len(p.scores) for p in predictions) else None
  best = []
  for record in records:
    image_id = int(record["image_id"])
    people = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id, iscrowd=False)) if a["num_keypoints"] >= 4]
    if not people:
      continue
    if dt is None or not dt.getAnnIds(imgIds=image_id):
      best += [0.0] * len(people)
      continue
    scorer = COCOeval(gt, dt, "keypoints")
    scorer.params.imgIds = [image_id]
    scorer._prepare()                       # pylint: disable=protected-access
    oks = np.asarray(scorer.computeOks(image_id, 1))     # (detections, ground truths of the image)
    order = [g["id"] for g in scorer._gts[image_id, 1]]  # pylint: disable=protected-access
    best += [float(oks[:, order.index(a["id"])].max()) for a in people]
  return np.asarray(best)


def test_grouped_poses_match_the_people_in_held_out_images(trained, tmp_path):
  config, summary, variables = trained
  records = bottomup_data.load_image_records(config)
  runner = bottomup.BottomUp(config, predict.build_apply_fn(config), variables)
  predictions = [runner(read_image(r["file"])) for r in records]
  oks = best_oks(config, records, predictions, str(tmp_path))
  control = best_oks(config, records, predictions[1:] + predictions[:1], str(tmp_path))   # another image's poses
  print(f"best OKS per person: median {np.median(oks):.3f}, mean {oks.mean():.3f}, >= 0.5 for "
        f"{(oks >= 0.5).mean():.3f} of {len(oks)}; another image's poses: median {np.median(control):.3f}, "
        f"mean {control.mean():.3f}")
  assert len(oks) >= 40
  assert np.median(oks) >= OKS_MEDIAN and oks.mean() >= 2 * control.mean(), (oks, control)
