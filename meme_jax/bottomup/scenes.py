"""Known people as DEM network outputs: the ideal outputs (the codec's training targets) or those of a simulated
imperfect network, for whole synthetic crowded scenes or annotated images.

The codec upper bound (`upper_bound_predictions`) feeds the ideal outputs of the ground truth through the whole
bottom-up post-processing; the grouping tests and `meme_jax.bottomup.benchmark` use the synthetic scenes.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from meme_jax.bottomup import grouping
from meme_jax.bottomup.inference import BottomUp
from meme_jax.bottomup.inference import TestOptions
from meme_jax.bottomup.inference import multi_scale_size
from meme_jax.bottomup.inference import predict_from_maps
from meme_jax.codecs.affine import apply_affine
from meme_jax.codecs.affine import get_affine_transform
from meme_jax.codecs.dem import DEMCodec


# ---------------------------------------------------------------------------------------------------------------
# Ideal outputs and the upper bound.


def people_on_map(codec, people: np.ndarray, stride: int, map_width: int, flip: bool = False) -> np.ndarray:
  """People (N, K, 3) in input pixels -> the pixels of the maps at `stride` in the codec's `map_frame`, as
  training places them; with `flip`, in the maps of the mirrored input (`map_width` wide), re-indexed."""
  p = codec.to_resolution(people, 1, input_size=stride)
  if flip:
    p = p[:, codec.flip_index]
    p[..., 0] = map_width - 1 - p[..., 0]
  return p


def ideal_outputs(codec, people: np.ndarray, input_hw: Tuple[int, int], person_tags: Sequence[float], *,
                  flip: bool = False, input_size: int):
  """What a perfect network would output for people (N, K, 3) in network-input pixels of an input of size
  `input_hw` (any aspect): the training targets of the codec rendered at 1/4 and 1/2 of the input, with tag maps
  holding `person_tags`. With `flip`, the outputs for the mirrored input (people mirrored at each resolution and
  re-indexed, as the training flip). Offsets are in the network's normalisation (/ (sqrt(2) input_size) input px).
  Returns the four maps NHWC with batch 1."""
  height, width = input_hw
  if height % 4 or width % 4:
    raise ValueError(f"input size {input_hw} must be divisible by 4")
  side = max(height, width)
  outputs = {}
  for stride in (4, 2):
    r = side // stride
    h, w = height // stride, width // stride
    p = people_on_map(codec, people, stride, w, flip)
    # Rendered on an r x r canvas (the codec's square maps) and cropped; the offsets re-normalised from the canvas
    # diagonal to the network's sqrt(2) * input_size.
    heat = codec.heatmaps(p, r)[:h, :w]
    offsets = codec.offsets(p, r)[:h, :w] * (codec.offset_norm(r) * stride / codec.offset_norm(input_size))
    tags = codec.tag_maps(p, r, person_tags)[:h, :w]
    outputs[stride] = (heat, offsets, tags)
  quarter = np.concatenate([outputs[4][0], outputs[4][2]], axis=-1)
  return (outputs[4][1][None], outputs[2][1][None], quarter[None], outputs[2][0][None])


def people_to_input(keypoints: np.ndarray, center, scale_wh, size) -> np.ndarray:
  """(N, J, 3) image keypoints -> network-input pixels of the resize (center, scale, size); v kept."""
  out = np.array(keypoints, np.float64, copy=True)
  out[..., :2] = apply_affine(out[..., :2], get_affine_transform(center, scale_wh, 0, size))
  return out


def upper_bound_predictions(config, records: Sequence[Dict[str, Any]], *, flip: Optional[bool] = None,
                            scale_factors: Sequence[float] = (1.0,),
                            params: Optional[grouping.GroupingParams] = None) -> List[Dict[str, Any]]:
  """GT people -> ideal network outputs at each of `scale_factors` (and the mirror with flip test) -> the full
  bottom-up post-processing (combine, aggregate, group, back-project). `records`: dicts with 'image_id', 'height',
  'width', 'keypoints' (N, J, 3) image pixels in the network's joint order. Returns one dict per image: image_id,
  keypoints (P, J, 3), scores (P,)."""
  codec = DEMCodec.from_config(config)
  options = dataclasses.replace(TestOptions.from_config(config), scale_factors=tuple(float(s) for s in scale_factors))
  if flip is not None:
    options = dataclasses.replace(options, flip_test=bool(flip))
  runner = BottomUp(config, None, None, params=params, options=options)
  results = []
  for record in records:
    image_hw = (int(record["height"]), int(record["width"]))
    outputs = scene_outputs(codec, record["keypoints"], image_hw, options)
    prediction = predict_from_maps(runner.maps_from_outputs(outputs, image_hw), runner.groups, runner.params)
    results.append(dict(image_id=record["image_id"], keypoints=prediction.keypoints, scores=prediction.scores))
  return results


# ---------------------------------------------------------------------------------------------------------------
# Synthetic crowded scenes.


def random_pose(rng: np.random.Generator, dataset: str = "coco") -> np.ndarray:
  """A random standing / gesturing person, (J, 2) in units of its height, origin at the mid-hip, y down, in the
  dataset's joint order ('coco' 17 joints or 'crowdpose' 14). The person's left side is +x, or -x when it faces
  away from the camera."""
  def limb(start, angle, length):
    return start + length * np.array([np.sin(angle), np.cos(angle)])

  lean = rng.uniform(-0.15, 0.15)
  neck = limb(np.zeros(2), np.pi + lean, 0.30)
  sho = {+1: neck + [0.11, 0.0], -1: neck + [-0.11, 0.0]}
  hip = {+1: np.array([0.075, 0.0]), -1: np.array([-0.075, 0.0])}
  elbow, wrist, knee, ankle = {}, {}, {}, {}
  for side in (+1, -1):
    upper = side * rng.uniform(-0.3, 2.6)
    elbow[side] = limb(sho[side], upper, 0.17)
    wrist[side] = limb(elbow[side], upper + side * rng.uniform(-1.2, 1.5), 0.15)
    thigh = side * rng.uniform(-0.2, 0.45)
    knee[side] = limb(hip[side], thigh, 0.24)
    ankle[side] = limb(knee[side], thigh + rng.uniform(-0.5, 0.5), 0.23)
  nose = limb(neck, np.pi + lean + rng.uniform(-0.3, 0.3), 0.11)
  if dataset == "coco":
    pose = [nose, nose + [0.025, -0.02], nose + [-0.025, -0.02], nose + [0.055, -0.005], nose + [-0.055, -0.005],
            sho[1], sho[-1], elbow[1], elbow[-1], wrist[1], wrist[-1], hip[1], hip[-1], knee[1], knee[-1],
            ankle[1], ankle[-1]]
  elif dataset == "crowdpose":
    pose = [sho[1], sho[-1], elbow[1], elbow[-1], wrist[1], wrist[-1], hip[1], hip[-1], knee[1], knee[-1],
            ankle[1], ankle[-1], limb(nose, np.pi + lean, 0.07), neck]
  else:
    raise ValueError(f"random_pose: dataset {dataset!r} is not 'coco' or 'crowdpose'")
  pose = np.array(pose)
  angle = rng.uniform(-0.25, 0.25)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  pose = pose @ rotation.T
  if rng.random() < 0.5:
    pose[:, 0] = -pose[:, 0]
  return pose


def synthetic_scene(rng: np.random.Generator, num_people: int, image_hw: Tuple[int, int], *, dataset: str = "coco",
                    height_range: Optional[Tuple[float, float]] = None, min_joint_distance: float = 28.0,
                    min_center_distance: float = 28.0, drop_prob: float = 0.1, max_tries: int = 4000) -> np.ndarray:
  """Up to `num_people` random people (N, J, 3) in image pixels, heavily overlapping (boxes are not constrained),
  with joints of the same type at least `min_joint_distance` apart across people and person centres at least
  `min_center_distance` apart. Each joint is unlabelled (0, 0, 0) with probability `drop_prob`. People are
  `height_range` pixels tall (default 0.3 to 0.67 of the image height)."""
  height, width = image_hw
  if height_range is None:
    height_range = (0.3 * height, 0.67 * height)
  people: List[np.ndarray] = []
  for _ in range(max_tries):
    if len(people) == num_people:
      break
    pose = random_pose(rng, dataset) * rng.uniform(*height_range)
    low, high = pose.min(axis=0), pose.max(axis=0)
    if np.any(high - low > [width - 8, height - 8]):
      continue
    origin = rng.uniform(4 - low, [width - 4, height - 4] - high)
    pose = pose + origin
    if people:
      others = np.stack(people)
      if np.min(np.linalg.norm(others - pose[None], axis=-1)) < min_joint_distance:
        continue
      if np.min(np.linalg.norm(others.mean(axis=1) - pose.mean(axis=0), axis=-1)) < min_center_distance:
        continue
    people.append(pose)
  keypoints = np.zeros((len(people), people[0].shape[0] if people else 0, 3))
  for n, pose in enumerate(people):
    visible = rng.random(len(pose)) >= drop_prob
    visible[rng.integers(len(pose))] = True
    keypoints[n, visible, :2] = pose[visible]
    keypoints[n, visible, 2] = 2
  return keypoints


def coco_ground_truth(keypoints_per_image: Sequence[np.ndarray], image_hws: Sequence[Tuple[int, int]],
                      joint_names: Sequence[str], crowd_index: Optional[Sequence[float]] = None) -> Dict[str, Any]:
  """A COCO keypoint annotation dict for synthetic people (image ids 1..n; area = 0.53 of the joints' box padded by
  10 %, the CrowdPose convention for boxes without segmentations)."""
  images, annotations = [], []
  for i, (people, (height, width)) in enumerate(zip(keypoints_per_image, image_hws)):
    image = dict(id=i + 1, file_name=f"synthetic_{i + 1:06d}.jpg", height=int(height), width=int(width))
    if crowd_index is not None:
      image["crowdIndex"] = float(crowd_index[i])
    images.append(image)
    for person in people:
      labelled = person[:, 2] > 0
      low, high = person[labelled, :2].min(axis=0), person[labelled, :2].max(axis=0)
      pad = 0.05 * (high - low)
      box = [float(v) for v in np.concatenate([low - pad, high - low + 2 * pad])]
      annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=1, iscrowd=0, bbox=box,
                              area=0.53 * box[2] * box[3], num_keypoints=int(labelled.sum()),
                              keypoints=[float(v) for v in person.reshape(-1)]))
  return dict(images=images, annotations=annotations,
              categories=[dict(id=1, name="person", supercategory="person", keypoints=list(joint_names),
                               skeleton=[])])


@dataclasses.dataclass(frozen=True)
class OutputNoise:
  """Errors of a simulated imperfect network (`noisy_outputs`); lengths in units of the person's height.

  Each labelled point gets a confidence c ~ U(min_confidence, 1) (its heatmap peak value) and its heatmap peak is
  displaced by N(0, (location_sigma[0] + location_sigma[1] (1 - c)) h): unsure joints are also badly placed.
  The offset field around a detected joint points from each pixel to the TRUE parent / centre plus N(0,
  offset_sigma h) per window, as the training targets teach (a field "target - pixel", so reading it at a misplaced
  peak carries the peak's error). Tags get N(0, tag_sigma) per joint. Heatmaps get N(0, heat_sigma) per pixel,
  which breaks the exact ties of the codec's symmetric Gaussians that no trained network produces.
  """
  min_confidence: float = 0.3
  location_sigma: Tuple[float, float] = (0.01, 0.06)
  offset_sigma: float = 0.02
  tag_sigma: float = 0.1
  heat_sigma: float = 1e-3


def noisy_outputs(codec, people: np.ndarray, input_hw: Tuple[int, int], person_tags: Sequence[float],
                  rng: np.random.Generator, noise: OutputNoise, *, input_size: int, flip_test: bool = True):
  """Network-like outputs (batch 2 with the mirror, or 1) for true people (N, K, 3) in input pixels, with the
  errors of `noise` (the same draws in both mirror halves). See `ideal_outputs` for the layout."""
  people = np.asarray(people, np.float64)
  n, k = people.shape[:2]
  labelled = people[..., 2] > 0
  extent = np.array([np.ptp(p[labelled[i], :2], axis=0).max() if labelled[i].sum() > 1 else 1.0
                     for i, p in enumerate(people)])
  confidence = rng.uniform(noise.min_confidence, 1.0, (n, k))
  sigma = (noise.location_sigma[0] + noise.location_sigma[1] * (1 - confidence)) * extent[:, None]
  detected = people.copy()
  detected[..., :2] += rng.normal(size=(n, k, 2)) * sigma[..., None]
  # Per offset group: (joint, target points) with the targets' true positions plus the offset error.
  targets = {}
  for group in codec.offset_layout:
    points = ([group.parent] if group.parent is not None else []) + [k - 1]
    targets[group.joint] = {p: people[:, p, :2] + rng.normal(size=(n, 2)) * noise.offset_sigma * extent[:, None]
                            for p in points}
  tag_noise = rng.normal(size=(n, k)) * noise.tag_sigma

  def render(flip: bool):
    height, width = input_hw
    side = max(height, width)
    maps = {}
    for stride in (4, 2):
      r = side // stride
      h, w = height // stride, width // stride

      def to_map(points):
        return people_on_map(codec, points, stride, w, flip)

      heat = np.zeros((r, r, k), np.float32)
      for i in range(n):
        heat = np.maximum(heat, codec.heatmaps(to_map(detected[i:i + 1]), r) * confidence[i][
            codec.flip_index if flip else slice(None)].astype(np.float32))
      heat = heat + (rng.normal(size=heat.shape) * noise.heat_sigma).astype(np.float32)
      offsets = np.zeros((r, r, codec.num_offset_channels), np.float32)
      for group in codec.offset_layout:
        rows = detected.copy()
        for point, xy in targets[group.joint].items():
          rows[:, point, :2] = xy
        rows[:, group.joint] = detected[:, group.joint]
        rendered = codec.offsets(to_map(rows), r)
        # In the mirrored frame this joint's channels sit where its mirror joint's do.
        source = codec.flip_index[group.joint] if flip else group.joint
        channel = [g for g in codec.offset_layout if g.joint == source][0].channel
        offsets[..., channel:channel + group.num_channels] = rendered[..., channel:channel + group.num_channels]
      offsets *= codec.offset_norm(r) * stride / codec.offset_norm(input_size)
      tags = codec.tag_maps(to_map(detected), r, person_tags)
      if n:
        index = np.rint((tags - person_tags[0]) / (person_tags[1] - person_tags[0])).astype(np.int64) \
            if n > 1 else np.zeros(tags.shape, np.int64)
        channel_noise = tag_noise[:, codec.flip_index] if flip else tag_noise
        tags = np.where(tags != 0, tags + channel_noise[np.clip(index, 0, n - 1), np.arange(k)], 0.0)
      maps[stride] = (heat[:h, :w], offsets[:h, :w], tags[:h, :w].astype(np.float32))
    quarter = np.concatenate([maps[4][0], maps[4][2]], axis=-1)
    return (maps[4][1][None], maps[2][1][None], quarter[None], maps[2][0][None])

  outputs = render(False)
  if flip_test:
    outputs = tuple(np.concatenate(pair, axis=0) for pair in zip(outputs, render(True)))
  return outputs


def scene_outputs(codec, keypoints: np.ndarray, image_hw: Tuple[int, int], options: TestOptions, *,
                  rng: Optional[np.random.Generator] = None, noise: Optional[OutputNoise] = None,
                  person_tags: Optional[Sequence[float]] = None) -> List[Tuple[float, Tuple[np.ndarray, ...]]]:
  """[(scale, outputs)] a network would give for image keypoints (N, J, 3) at every test scale of `options`:
  ideal outputs, or with `noise` (and `rng`) simulated errors. The errors are drawn once per scene, in units of the
  person's size, so every scale sees the same mistakes in image space (only the per-pixel heatmap noise differs)."""
  height, width = image_hw
  min_scale = min(options.scale_factors)
  scene_seed = int(rng.integers(2 ** 31)) if noise is not None else 0
  keypoints = np.asarray(keypoints, np.float64).reshape(-1, codec.num_joints, 3)
  result = []
  for s in sorted(options.scale_factors, reverse=True):
    size, center, scale_wh = multi_scale_size(height, width, options.input_size, s, min_scale)
    people = codec.add_centers(people_to_input(keypoints, center, scale_wh, size))
    people = people[people[:, -1, 2] > 0]
    tags = person_tags if person_tags is not None else 1.0 + 3.0 * np.arange(len(people))
    input_hw = (size[1], size[0])
    if noise is None:
      outputs = ideal_outputs(codec, people, input_hw, tags, input_size=options.input_size)
      if options.flip_test:
        mirrored = ideal_outputs(codec, people, input_hw, tags, flip=True, input_size=options.input_size)
        outputs = tuple(np.concatenate(pair, axis=0) for pair in zip(outputs, mirrored))
    else:
      outputs = noisy_outputs(codec, people, input_hw, tags, np.random.default_rng(scene_seed), noise,
                              input_size=options.input_size, flip_test=options.flip_test)
    result.append((s, outputs))
  return result
