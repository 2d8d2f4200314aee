"""DEM person assembly: candidates -> Global Embedding seeds -> AE torso joints -> Local Embedding limbs -> MRM,
adjust, refine.

Input: the aggregated maps of one image at the base size (scale 1.0), from `meme_jax.bottomup.inference`:
  heatmaps (H, W, K)      K = J joints + the person centre (last channel)
  tags     (H, W, K, T)   T tag samples per pixel (2: the image and its mirror; without flip test the tag is
                          repeated so that distances and TAG_THRESHOLD mean the same thing)
  offsets  (H, W, N_off)  Local-Embedding offsets in BASE-MAP PIXELS, the network's layout (dy, dx pairs; per
                          centre-only joint: to centre; per hierarchical joint: to parent, then to centre)

Steps (each threshold comes from `GroupingParams`, i.e. from `config.test`):
1. `extract_candidates` (jitted): NMS by max pooling (joints: `nms_kernel`; centre: the hierarchical pool, kernel by
   map size), top `max_num_people` per channel, thresholds, and the tags / offsets read at each candidate.
2. `assemble` (numpy, small matrices):
   A. every centre candidate seeds a person (Global Embedding);
   B. torso joints (RJG) join persons by associative embedding: Hungarian assignment on round(|tag - mean|) * 100 -
      score, accepted below `tag_threshold`; unmatched ones start centre-less persons;
   C. centre-only joints (face, head/neck) join the closest centre their predicted centre lands near (greedy,
      `le_distance`);
   D. hierarchical limb joints, along the kinematic chain (elbow <- shoulder, wrist <- elbow, knee <- hip, ...):
      predicted parent -> the parents already placed (greedy), the rest by predicted centre (greedy, `le_distance`).
3. persons with any joint, scored by the mean joint score, capped to the `max_persons` best;
4. Mutual Refine Machine (`mrm`, off by default, as the original runs), adjust (+0.5 +-0.25 toward the higher
   neighbour), refine (missing joints from the tag-consistent heatmap maximum).

Fixed here against the original code, each selectable where it changes the original's numbers
(`GroupingParams.original()` reproduces the original parser):
- a limb joint is attached to a parent only within `parent_distance` pixels, and only if its predicted centre
  agrees with that parent's person (`parent_center_check`), and only if its parent offset is not ~0
  (`min_parent_offset`: no parent offset is trained where the parent is unlabelled); the original took any distance,
  so a limb whose own parent was missed was forced onto some other person's parent;
- persons without a centre (started by an unmatched torso joint) take no part in the centre fallback
  (the original gave them centre (0, 0), so limbs near the image origin could attach to them) -
  `centerless_fallback`;
- at most `max_persons` persons per image, the best by score (COCOeval keeps 20 anyway; the original
  returned all, up to 30 centres plus every unmatched torso joint);
- `adjust` is its own switch (the original tied it to `refine`);
- persons are identified by index, not by their float tag, so equal tags cannot merge two persons;
- the chain follows the parent table, so any number of torso joints works (MPII has 6; the original chose a
  table by dataset name, and the MPII yaml's name selected COCO's).
Candidates that tie exactly inside one NMS window (a plateau, e.g. a peak upsampled 2x) are kept once
(`dedupe_plateaus`); the original kept every pixel of the plateau as a separate candidate.
"""
import dataclasses
import functools
import math
from typing import Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from meme_jax.codecs.dem import JointGroups

# ---------------------------------------------------------------------------------------------------------------
# Grouping parameters.


@dataclasses.dataclass(frozen=True)
class GroupingParams:
  """Thresholds and switches of candidate extraction and grouping; `from_config` reads them from `config.test`.

  Defaults are the original's test settings with its faults fixed (module docstring);
  `original()` gives the original parser exactly.
  """
  max_num_people: int = 30            # candidates per channel; persons considered in AE matching (MAX_NUM_PEOPLE)
  nms_kernel: int = 5                 # joint NMS window (TEST.NMS_KERNEL)
  # Hierarchical centre pool: the first kernel whose size bound (H + W) / 2 exceeds; the original's 7/5/3.
  center_pool: Tuple[Tuple[float, int], ...] = ((300.0, 7), (200.0, 5), (0.0, 3))
  detection_threshold: float = 0.1    # joint candidates: score > this (hard-coded 0.1 in the original)
  center_threshold: float = 0.01      # centre candidates: score > this
  tag_threshold: float = 1.0          # AE: accept a torso joint for a person when |tag - mean tag| < this
  use_detection_val: bool = True      # AE cost round(d) * 100 - score (else d)
  ignore_too_much: bool = False       # skip a torso joint type once max_num_people persons exist
  le_distance: float = 70.0           # centre fallback: predicted centre within this many base-map pixels
  parent_distance: float = 70.0       # predicted parent within this many pixels (inf = the original)
  limb_matching: str = "greedy"       # 'greedy' (global-min first, the original) | 'hungarian' (min total distance)
  # A limb joint joins a parent's person only if its predicted centre is also within le_distance of that person's
  # centre (when the person has one); else it goes to the centre fallback. Catches limbs whose own parent was not
  # detected (their parent offset points nowhere useful). The original had no such check.
  parent_center_check: bool = True
  # A parent offset shorter than this (base-map pixels) carries no parent: training writes no parent offset where
  # the parent is unlabelled (the original's targets pointed at the unlabelled (0, 0) parent), so such a limb joint
  # would match whatever parent lies nearest to itself. These joints go to the centre fallback. 0 = the original
  # (every candidate takes part).
  min_parent_offset: float = 1.0
  centerless_fallback: bool = False   # True lets centre-less persons (centre (0, 0)) take part, as the original
  dedupe_plateaus: bool = True        # keep one candidate per exactly-tied plateau inside an NMS window
  # Mutual Refine Machine before adjust (the original implements it but never calls it). Off by default: it raises
  # COCO AP slightly on the crowded synthetic benchmark's noisy ideal maps (`python -m meme_jax.bottomup.benchmark
  # --grouping_benchmark`), where offsets are more precise than unsure heatmap peaks, but it cost AP on every
  # trained network measured (0.008-0.015 on the synthetic job's) and on the exact ideal maps (0.012).
  mrm: bool = False
  mrm_threshold: float = 0.75         # a joint supports a neighbour when its score exceeds this and the neighbour's
  adjust: bool = True                 # +0.5 +-0.25 quarter-pixel shift toward the higher neighbour
  refine: bool = True                 # fill missing joints from the tag-consistent heatmap maximum
  max_persons: int = 20               # persons kept per image, best score first (0 = all, as the original)

  def __post_init__(self):
    if self.limb_matching not in ("greedy", "hungarian"):
      raise ValueError(f"limb_matching={self.limb_matching!r}: expected 'greedy' or 'hungarian'")
    if self.nms_kernel % 2 != 1 or any(k % 2 != 1 for _, k in self.center_pool):
      raise ValueError(f"NMS kernels must be odd (nms_kernel={self.nms_kernel}, center_pool={self.center_pool})")
    if self.max_num_people < 1:
      raise ValueError(f"max_num_people={self.max_num_people} must be positive")

  @classmethod
  def original(cls, **overrides) -> "GroupingParams":
    """The parser of the original code: no parent distance limit, centre-less persons in the fallback, every
    plateau pixel a candidate, no MRM, no person cap."""
    values = dict(parent_distance=math.inf, parent_center_check=False, min_parent_offset=0.0, centerless_fallback=True,
                  dedupe_plateaus=False, mrm=False, max_persons=0)
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_config(cls, config) -> "GroupingParams":
    """From `config.test` (field names as this class); a missing field keeps its default.
    `config.data.max_num_people` is used when `config.test` has none."""
    test = config.get("test", {}) if hasattr(config, "get") else {}
    values = {}
    for field in dataclasses.fields(cls):
      if field.name in test:
        values[field.name] = test[field.name]
    if "max_num_people" not in values and "data" in config and "max_num_people" in config.data:
      values["max_num_people"] = config.data.max_num_people
    if "center_pool" in values:
      values["center_pool"] = tuple((float(a), int(b)) for a, b in values["center_pool"])
    for name in ("parent_distance", "le_distance"):
      if name in values and (values[name] is None or float(values[name]) <= 0):
        values[name] = math.inf
    return cls(**values)

  def center_kernel(self, height: int, width: int) -> int:
    """The centre NMS kernel for a (height, width) map (the original's `hierarchical_pool`)."""
    size = (height + width) / 2.0
    for bound, kernel in self.center_pool:
      if size > bound:
        return kernel
    return self.center_pool[-1][1]


# ---------------------------------------------------------------------------------------------------------------
# 1. Candidates.


class Candidates(NamedTuple):
  """Top-k peaks per channel (numpy). Row k of each array is channel k (joints, then the centre).

  scores (K, M); xy (K, M, 2) integer pixel (x, y); valid (K, M) above the threshold;
  tags (K, M, T); offsets (K, M, N_off) every offset channel at the candidate pixel (base-map pixels).
  Rows are sorted by score (best first), as top-k returns them.
  """
  scores: np.ndarray
  xy: np.ndarray
  valid: np.ndarray
  tags: np.ndarray
  offsets: np.ndarray


def _max_pool(x, kernel: int):
  """Stride-1 max pool of (H, W, C) with -inf padding kernel // 2 (torch MaxPool2d(k, 1, k // 2)); separable,
  which is exact for a max and several times faster than a 2-D window on CPU."""
  pad = kernel // 2
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (kernel, 1, 1), (1, 1, 1), ((pad, pad), (0, 0), (0, 0)))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, 1), (1, 1, 1), ((0, 0), (pad, pad), (0, 0)))


def _earlier_max(x, kernel: int):
  """For each pixel, the max of x over the part of its kernel x kernel window that comes before it in raster order
  (the rows above, and the pixels to its left); -inf where that part is empty."""
  height, width = x.shape[:2]
  r = kernel // 2
  rows = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, 1), (1, 1, 1), ((0, 0), (r, r), (0, 0)))
  above = jax.lax.reduce_window(rows, -jnp.inf, jax.lax.max, (r, 1, 1), (1, 1, 1), ((r, 0), (0, 0), (0, 0)))
  left = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, r, 1), (1, 1, 1), ((0, 0), (r, 0), (0, 0)))
  return jnp.maximum(above[:height], left[:, :width])


def _nms_keep(x, kernel: int, dedupe: bool):
  """Pixels equal to the max of their window; with `dedupe`, of an exactly flat maximum only the first pixel in
  raster order (the original kept every pixel of a plateau, so a peak upsampled 2x became up to four candidates that
  also took the top-k places of other people)."""
  keep = _max_pool(x, kernel) == x
  if dedupe:
    kept = jnp.where(keep, x, -jnp.inf)
    keep &= ~(_earlier_max(kept, kernel) >= x)
  return keep


@functools.partial(jax.jit, static_argnames=("top_k", "nms_kernel", "center_kernel", "dedupe"))
def _peaks(heatmaps, tags, offsets, *, top_k: int, nms_kernel: int, center_kernel: int, dedupe: bool):
  """NMS, top-k and the reads at the peaks, on the device; returns small arrays."""
  height, width, k = heatmaps.shape
  keep = jnp.concatenate([_nms_keep(heatmaps[..., :-1], nms_kernel, dedupe),
                          _nms_keep(heatmaps[..., -1:], center_kernel, dedupe)], axis=-1)
  peaks = jnp.where(keep, heatmaps, 0.0)
  scores, index = jax.lax.top_k(peaks.reshape(height * width, k).T, top_k)     # (K, M)
  xy = jnp.stack([index % width, index // width], axis=-1)
  flat_tags = tags.reshape(height * width, k, -1)
  tags_at = flat_tags[index, jnp.arange(k)[:, None]]                            # (K, M, T)
  offsets_at = offsets.reshape(height * width, -1)[index]                       # (K, M, N_off)
  return scores, xy, tags_at, offsets_at


def extract_candidates(heatmaps, tags, offsets, params: GroupingParams) -> Candidates:
  """Candidate joints and centres of one image, as numpy arrays."""
  height, width, k = heatmaps.shape
  top_k = min(params.max_num_people, height * width)
  scores, xy, tags_at, offsets_at = jax.device_get(_peaks(
      heatmaps, tags, offsets, top_k=top_k, nms_kernel=params.nms_kernel,
      center_kernel=params.center_kernel(height, width), dedupe=params.dedupe_plateaus))
  # Thresholds compare in float32, as the original's torch comparison does (0.1 in float32 is not > 0.1).
  thresholds = np.full((k, 1), params.detection_threshold, np.float32)
  thresholds[-1] = params.center_threshold
  valid = np.asarray(scores, np.float32) > thresholds
  return Candidates(np.asarray(scores, np.float64), np.asarray(xy, np.int64), valid,
                    np.asarray(tags_at, np.float64), np.asarray(offsets_at, np.float64))


# ---------------------------------------------------------------------------------------------------------------
# 2. Assembly.


def greedy_match(dist2: np.ndarray, max_dist: float = math.inf) -> List[Tuple[int, int]]:
  """Repeatedly pairs the globally closest (row, column), each used once, until the closest pair is farther than
  `max_dist` (squared distances in, as the original compares them); ties go to the first in row-major order."""
  dist2 = np.array(dist2, np.float64, copy=True)
  pairs = []
  limit = max_dist ** 2
  for _ in range(min(dist2.shape) if dist2.size else 0):
    flat = int(np.argmin(dist2))
    r, c = divmod(flat, dist2.shape[1])
    if not dist2[r, c] <= limit:
      break
    pairs.append((r, c))
    dist2[r, :] = np.inf
    dist2[:, c] = np.inf
  return pairs


def hungarian_match(dist2: np.ndarray, max_dist: float = math.inf) -> List[Tuple[int, int]]:
  """Most pairs within `max_dist`, and among those the minimum total distance (pairs farther cost 1e6, more than
  any sum of real distances; they are dropped from the result). Rows in ascending order."""
  if dist2.size == 0:
    return []
  dist = np.sqrt(dist2)
  rows, cols = linear_sum_assignment(np.where(dist <= max_dist, dist, 1e6))
  return [(int(r), int(c)) for r, c in zip(rows, cols) if dist[r, c] <= max_dist]


def ae_cost(candidate_tags: np.ndarray, candidate_scores: np.ndarray, person_tags: np.ndarray,
            use_detection_val: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """(cost, distance) of assigning candidates (n, T) to persons with mean tags (p, T): distance = L2; cost =
  round(distance) * 100 - score (the detection value breaks ties between equally-near tags)."""
  dist = np.linalg.norm(candidate_tags[:, None, :] - person_tags[None, :, :], axis=-1)
  cost = np.round(dist) * 100 - candidate_scores[:, None] if use_detection_val else dist.copy()
  return cost, dist


class _People:
  """Growing person store: joints (x, y, score, e1, e2) per point (K rows), tag history, centre flag."""

  def __init__(self, num_points: int):
    self.num_points = num_points
    self.joints: List[np.ndarray] = []
    self.tag_history: List[List[np.ndarray]] = []
    self.has_center: List[bool] = []

  def add(self, tag, has_center: bool) -> int:
    self.joints.append(np.zeros((self.num_points, 5)))
    self.tag_history.append([np.asarray(tag, np.float64)])
    self.has_center.append(has_center)
    return len(self.joints) - 1

  def __len__(self):
    return len(self.joints)


def assemble(cands: Candidates, groups: JointGroups, params: GroupingParams) -> Tuple[np.ndarray, np.ndarray]:
  """Groups candidates into persons (steps 2 A-D of the module docstring). Returns (persons (P, K, 5) in base-map pixels, columns x,
  y, score, e1, e2 where (e1, e2) is the tag pair for torso joints and the centre and the offset to the parent
  (hierarchical joints) or to the centre (centre-only joints); has_center (P,) bool). Persons without any joint
  score are dropped; order is creation order."""
  centre = groups.center
  people = _People(groups.num_points)

  def rows(k):
    return np.flatnonzero(cands.valid[k])

  # A. Global Embedding: one person per centre candidate.
  for m in rows(centre):
    pid = people.add(cands.tags[centre, m], True)
    x, y = cands.xy[centre, m]
    people.joints[pid][centre] = (x, y, cands.scores[centre, m], cands.tags[centre, m, 0], cands.tags[centre, m, -1])
  if len(people) == 0:
    return np.zeros((0, groups.num_points, 5)), np.zeros((0,), bool)
  centred = list(range(len(people)))

  # Where each joint type was placed: (locations (n, 2), person ids (n,)), parents for the limb steps.
  placed: Dict[int, Tuple[np.ndarray, List[int]]] = {}

  # B. Torso joints by associative embedding (Hungarian).
  for j in groups.rjg:
    idx = rows(j)
    placed[j] = (np.zeros((0, 2)), [])
    if idx.size == 0:
      continue
    if params.ignore_too_much and len(people) >= params.max_num_people:
      continue
    person_ids = list(range(min(len(people), params.max_num_people)))
    person_tags = np.stack([np.mean(people.tag_history[p], axis=0) for p in person_ids])
    tags = cands.tags[j, idx]
    cost, dist = ae_cost(tags, cands.scores[j, idx], person_tags, params.use_detection_val)
    n, p = cost.shape
    if n > p:
      cost = np.concatenate([cost, np.full((n, n - p), 1e10)], axis=1)
    rows_, cols_ = linear_sum_assignment(cost)
    keys = []
    for r, c in sorted(zip(rows_, cols_)):
      m = idx[r]
      record = (cands.xy[j, m, 0], cands.xy[j, m, 1], cands.scores[j, m], tags[r, 0], tags[r, -1])
      if c < p and dist[r, c] < params.tag_threshold:
        pid = person_ids[c]
        people.tag_history[pid].append(tags[r])
      else:
        pid = people.add(tags[r], False)
      people.joints[pid][j] = record
      keys.append(pid)
    placed[j] = (cands.xy[j, idx].astype(np.float64), keys)

  centres = np.array([people.joints[p][centre, :2] for p in range(len(people))])

  # C. Centre-only joints: predicted centre -> the closest centre of a centre-seeded person.
  for j in groups.ljg_center_only:
    idx = rows(j)
    if idx.size == 0:
      continue
    cx, cy = groups.centre_offset_channels(j)
    to_centre = cands.offsets[j, idx][:, [cx, cy]]
    predicted = cands.xy[j, idx] + to_centre
    dist2 = np.sum((predicted[:, None, :] - centres[centred][None, :, :]) ** 2, axis=-1)
    for r, c in _match(dist2, params.le_distance, "greedy"):
      m = idx[r]
      people.joints[centred[c]][j] = (*cands.xy[j, m], cands.scores[j, m], *to_centre[r])

  # D. Limb joints along the chain: to a placed parent, else to a centre.
  for j, parent in zip(groups.ljg_with_hier, groups.parents):
    idx = rows(j)
    placed[j] = (np.zeros((0, 2)), [])
    if idx.size == 0:
      continue
    px, py = groups.parent_offset_channels(j)
    cx, cy = groups.centre_offset_channels(j)
    to_parent = cands.offsets[j, idx][:, [px, py]]
    to_centre = cands.offsets[j, idx][:, [cx, cy]]
    xy = cands.xy[j, idx].astype(np.float64)
    parent_xy, parent_ids = placed[parent]
    locations, keys = [], []
    used = np.zeros(idx.size, bool)
    if len(parent_ids):
      dist2 = np.sum((xy[:, None, :] + to_parent[:, None, :] - parent_xy[None, :, :]) ** 2, axis=-1)
      if params.parent_center_check:
        owner_centres = centres[parent_ids]
        far = np.sum((xy[:, None, :] + to_centre[:, None, :] - owner_centres[None, :, :]) ** 2, axis=-1)
        far = far > params.le_distance ** 2
        dist2[far & np.array([people.has_center[p] for p in parent_ids])[None, :]] = np.inf
      dist2[np.hypot(to_parent[:, 0], to_parent[:, 1]) < params.min_parent_offset] = np.inf
      for r, c in _match(dist2, params.parent_distance, params.limb_matching):
        pid = parent_ids[c]
        people.joints[pid][j] = (*xy[r], cands.scores[j, idx[r]], *to_parent[r])
        used[r] = True
        locations.append(xy[r])
        keys.append(pid)
    left = [p for p in range(len(people)) if p not in set(keys)
            and (people.has_center[p] or params.centerless_fallback)]
    rest = np.flatnonzero(~used)
    if left and rest.size:
      dist2 = np.sum((xy[rest, None, :] + to_centre[rest, None, :] - centres[left][None, :, :]) ** 2, axis=-1)
      for r, c in _match(dist2, params.le_distance, "greedy"):
        rr = rest[r]
        pid = left[c]
        people.joints[pid][j] = (*xy[rr], cands.scores[j, idx[rr]], *to_parent[rr])
        locations.append(xy[rr])
        keys.append(pid)
    placed[j] = (np.array(locations, np.float64).reshape(-1, 2), keys)

  persons = np.stack(people.joints)
  keep = persons[:, :groups.num_joints, 2].sum(axis=1) > 0
  return persons[keep], np.array(people.has_center)[keep]


def _match(dist2, max_dist, method):
  return greedy_match(dist2, max_dist) if method == "greedy" else hungarian_match(dist2, max_dist)


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Scoring, MRM, adjust, refine.


def person_scores(persons: np.ndarray, num_joints: int) -> np.ndarray:
  """Mean of the J joint scores (missing joints count 0), the original's person score."""
  return persons[:, :num_joints, 2].mean(axis=1) if len(persons) else np.zeros((0,))


def mutual_refine(persons: np.ndarray, groups: JointGroups, threshold: float) -> np.ndarray:
  """Mutual Refine Machine on (P, >=J, 5) persons; returns refined copies.

  A present joint j (score c_j > 0) is pulled toward where its confident kinematic neighbours place it: its parent
  predicts p_parent - o_j (o_j = j's offset to the parent), each child predicts p_child + o_child. A neighbour
  supports j when its score exceeds `threshold` and c_j. New position = score-weighted mean of j's own position and
  the supporting predictions. All updates use the unrefined values. This covers the original's three cases (wrists /
  ankles from their parents, elbows / knees from parent and child, shoulders / hips from their children).
  """
  out = persons.copy()
  if not len(persons):
    return out
  pos, score, off = persons[..., :2], persons[..., 2], persons[..., 3:5]
  total_w = score[:, :groups.num_joints].copy()
  total_p = pos[:, :groups.num_joints] * total_w[..., None]
  supporters = []   # (joint, predicting neighbour, predicted position (P, 2))
  for j, parent in zip(groups.ljg_with_hier, groups.parents):
    supporters.append((j, parent, pos[:, parent] - off[:, j]))
    supporters.append((parent, j, pos[:, j] + off[:, j]))
  for j, neighbour, predicted in supporters:
    c_j, c_n = score[:, j], score[:, neighbour]
    support = (c_j > 0) & (c_n > threshold) & (c_n > c_j)
    total_w[:, j] += np.where(support, c_n, 0.0)
    total_p[:, j] += np.where(support[:, None], c_n[:, None] * predicted, 0.0)
  changed = total_w > score[:, :groups.num_joints]
  out[:, :groups.num_joints, :2] = np.where(changed[..., None], total_p / np.maximum(total_w, 1e-12)[..., None],
                                            pos[:, :groups.num_joints])
  return out


def _quarter_shift(heat_k, x, y, width, height):
  """+0.25 toward the higher of the two neighbours in x and in y (else -0.25); x, y integer pixel."""
  right = heat_k(y, jnp.minimum(x + 1, width - 1))
  left = heat_k(y, jnp.maximum(x - 1, 0))
  down = heat_k(jnp.minimum(y + 1, height - 1), x)
  up = heat_k(jnp.maximum(y - 1, 0), x)
  return jnp.where(right > left, 0.25, -0.25), jnp.where(down > up, 0.25, -0.25)


@jax.jit
def _adjust_and_read_tags(heatmaps, tags, xy, joint_ids):
  """For joints (n,) at positions xy (n, 2): the adjusted positions (n, 2) and the tags (n, T) at them."""
  height, width, _ = heatmaps.shape
  xi = jnp.clip(jnp.trunc(xy[:, 0]).astype(jnp.int32), 0, width - 1)
  yi = jnp.clip(jnp.trunc(xy[:, 1]).astype(jnp.int32), 0, height - 1)
  dx, dy = _quarter_shift(lambda yy, xx: heatmaps[yy, xx, joint_ids], xi, yi, width, height)
  adjusted = jnp.stack([xy[:, 0] + 0.5 + dx, xy[:, 1] + 0.5 + dy], axis=-1)
  xa = jnp.clip(jnp.trunc(adjusted[:, 0]).astype(jnp.int32), 0, width - 1)
  ya = jnp.clip(jnp.trunc(adjusted[:, 1]).astype(jnp.int32), 0, height - 1)
  return adjusted, tags[ya, xa, joint_ids]


@jax.jit
def _read_tags(tags, xy, joint_ids):
  height, width = tags.shape[:2]
  xi = jnp.clip(jnp.trunc(xy[:, 0]).astype(jnp.int32), 0, width - 1)
  yi = jnp.clip(jnp.trunc(xy[:, 1]).astype(jnp.int32), 0, height - 1)
  return tags[yi, xi, joint_ids]


@jax.jit
def _refine_search(heatmaps, tags, joint_ids, prev_tags):
  """For each (joint k, person mean tag) pair: argmax of heat_k - round(|tag_k - mean|), adjusted position, heat.
  The maps are made channel-first once, so that each pair reads contiguous memory."""
  height, width, _ = heatmaps.shape
  heat_cf = jnp.transpose(heatmaps, (2, 0, 1))
  tags_cf = jnp.transpose(tags, (2, 3, 0, 1))          # (K, T, H, W)

  def one(args):
    k, prev = args
    heat, tag = heat_cf[k], tags_cf[k]
    # The sum over tag samples written out (T is static): XLA on CPU runs this several times faster than a
    # broadcast reduction over the leading axis.
    dist2 = sum((tag[t] - prev[t]) ** 2 for t in range(tag.shape[0]))
    flat = jnp.argmax((heat - jnp.round(jnp.sqrt(dist2))).ravel())
    y, x = flat // width, flat % width
    dx, dy = _quarter_shift(lambda yy, xx: heat[yy, xx], x, y, width, height)
    return jnp.stack([x + 0.5 + dx, y + 0.5 + dy, heat[y, x]])

  return jax.lax.map(one, (joint_ids, prev_tags))


def _bucket(n: int) -> int:
  """Padded length for jitted per-joint work, so that few shapes are compiled."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


def adjust_and_refine(persons: np.ndarray, heatmaps, tags, num_joints: int, *, adjust: bool = True,
                      refine: bool = True) -> np.ndarray:
  """Adjust present joints by a quarter pixel toward the higher neighbour (+0.5, the pixel centre), then fill each
  person's missing joints at argmax(heat_k - round(|tag_k - person's mean tag|)) if the heat there is > 0, as the
  original. Works on persons (P, K, 5) in base-map pixels; returns a copy."""
  out = persons.copy()
  if not len(persons) or not (adjust or refine):
    return out
  joints = out[:, :num_joints]
  present = joints[..., 2] > 0
  pi, ji = np.nonzero(present)
  n = _bucket(pi.size)
  xy = np.zeros((n, 2), np.float32)
  xy[:pi.size] = joints[pi, ji, :2]
  jid = np.zeros((n,), np.int32)
  jid[:pi.size] = ji
  if adjust:
    adjusted, at = jax.device_get(_adjust_and_read_tags(heatmaps, tags, xy, jid))
    joints[pi, ji, :2] = adjusted[:pi.size]
  else:
    at = jax.device_get(_read_tags(tags, xy, jid))
  if not refine:
    return out
  at = np.asarray(at[:pi.size], np.float64)
  prev = np.zeros((len(persons), at.shape[-1]))
  np.add.at(prev, pi, at)
  prev /= np.maximum(present.sum(axis=1), 1)[:, None]
  mp, mj = np.nonzero(~present)
  if mp.size == 0:
    return out
  n = _bucket(mp.size)
  jid = np.zeros((n,), np.int32)
  jid[:mp.size] = mj
  prev_tags = np.zeros((n, prev.shape[1]), np.float32)
  prev_tags[:mp.size] = prev[mp]
  found = np.asarray(jax.device_get(_refine_search(heatmaps, tags, jid, prev_tags)), np.float64)[:mp.size]
  add = found[:, 2] > 0
  joints[mp[add], mj[add], :2] = found[add, :2]
  joints[mp[add], mj[add], 2] = found[add, 2]
  return out


class Grouped(NamedTuple):
  """Persons of one image in base-map pixels: joints (P, J, 5) (x, y, score, e1, e2), scores (P,), has_center."""
  joints: np.ndarray
  scores: np.ndarray
  has_center: np.ndarray


def group(heatmaps, tags, offsets, groups: JointGroups, params: GroupingParams) -> Grouped:
  """The whole grouping of one image's aggregated maps (module docstring), in base-map pixels."""
  heatmaps, tags, offsets = jnp.asarray(heatmaps), jnp.asarray(tags), jnp.asarray(offsets)
  if heatmaps.shape[-1] != groups.num_points or tags.shape[2] != groups.num_points:
    raise ValueError(f"heatmaps {heatmaps.shape} / tags {tags.shape} must have K={groups.num_points} channels")
  if offsets.shape[-1] != groups.num_offsets:
    raise ValueError(f"offsets {offsets.shape} must have {groups.num_offsets} channels")
  cands = extract_candidates(heatmaps, tags, offsets, params)
  persons, has_center = assemble(cands, groups, params)
  scores = person_scores(persons, groups.num_joints)
  if params.max_persons > 0 and len(persons) > params.max_persons:
    order = np.argsort(-scores, kind="stable")[:params.max_persons]
    order.sort()
    persons, has_center, scores = persons[order], has_center[order], scores[order]
  if params.mrm:
    persons = mutual_refine(persons, groups, params.mrm_threshold)
  persons = adjust_and_refine(persons, heatmaps, tags, groups.num_joints, adjust=params.adjust,
                              refine=params.refine)
  return Grouped(persons[:, :groups.num_joints], scores, has_center)
