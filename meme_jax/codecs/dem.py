"""The double-embedding (DEM) method's joint groups and training targets.

`JointGroups` says which joints are grouped by tags and which by offsets, each limb joint's parent, the mirror
permutation and where each joint's offsets sit in the offset maps; grouping and flip test read it. `DEMCodec` turns
people into the training targets (heatmaps, Local-Embedding offsets, AE index lists) and mirrors maps laid out
like them.

People are arrays `(N, K, 3)` of (x, y, v) in the pixel frame of one output resolution r (square r x r maps), with
K = J + 1: the dataset's J joints and the person centre as the last point. The maps are NHWC like the model's outputs:
heatmaps `(r, r, K)`, offsets `(r, r, num_offset_channels)`.

Targets follow the original generators except for four defects, each fixed by default:
- the original placed people on an r x r map by scaling input pixels, x_r = x * r / S, and mirrored them there as
  x_r <- r - 1 - x_r while the image was mirrored by reversing its pixels (x <- S - 1 - x). The two mirrors agree
  only at the input size, so on flipped samples the targets lay 1 input pixel (at 1/2) and 3 input pixels (at 1/4)
  left of the joints in the image, half the samples having one target and half another. Here a map pixel covers
  the input pixels it covers on the image, x_r = (x + 0.5) * r / S - 0.5 (pixel centres, the frame of the test's
  bilinear resize), in which reversing the pixels mirrors every resolution alike. `original_map_frame=True` gives
  the original's frame.
- in the hierarchical and centre channels of limb joints the original overwrote overlapping windows but still
  counted them, so an overlap held the last person's value divided by the overlap count. Here every offset channel
  holds the average of the people covering the pixel. `original_offset_overlap=True` gives the original maps.
- the original wrote a limb joint's offset to its parent whenever the parent's coordinates fell inside the map,
  even for an unlabelled parent (whose (0, 0) lands anywhere after the affine). Here the parent must be labelled
  (v > 0) as well. `offsets_to_invisible_parents=True` gives the original maps.
- the parent table is not guessed from the dataset name (the original picked it by 'coco' in the name, which the
  MPII yaml also matches): each limb joint's parent comes from the config (`ljg_parents`, default joint index - 2,
  which is what COCO, CrowdPose and MPII in the original's joint order use), and one offset target per resolution
  is produced for every dataset (the original CrowdPose loader expected two and crashed).
None of the flags changes anything a converted checkpoint computes; they exist to reproduce the original training
targets.
Also different from the original, without a flag: AE index lists hold only people with a listed point, and people
beyond `max_people` of them are left out of the AE loss (the original raised an IndexError past 30 annotations).

Kept as in the original, so that training follows its recipe and converted checkpoints read back the same
offsets: integer truncation `int(x)` of positions (so x in (-1, 0) lands on column 0), a Gaussian of size
6*sigma+3 merged by element-wise max, the offset window of half-size tau = 7 at every resolution, offsets
normalised by Z = sqrt(2) * r, Delta-y before Delta-x in each channel pair.
"""
import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from meme_jax import keypoints as keypoints_lib


@dataclasses.dataclass(frozen=True)
class OffsetGroup:
  """The offset channels of one non-root joint: `channel` is the first of 2 (centre only) or 4 (parent, centre)."""
  joint: int
  parent: Optional[int]   # None for centre-only joints
  channel: int

  @property
  def num_channels(self) -> int:
    return 2 if self.parent is None else 4

  @property
  def center_channel(self) -> int:
    """First channel of the (Delta-y, Delta-x) pair pointing at the person centre."""
    return self.channel if self.parent is None else self.channel + 2


@dataclasses.dataclass(frozen=True)
class JointGroups:
  """Which joints are grouped how, and where each joint's offsets sit in the offset maps.

  Torso joints (`rjg`) are grouped by their tags and have no offset channels. The other joints own channels in joint
  index order, as the original offset head lays them out: 2 (dy, dx to the centre) per centre-only joint, 4 (dy, dx
  to the parent, then to the centre) per hierarchical limb joint.
  `ljg_with_hier` is in processing order (the original's: left/right elbows, wrists, then knees, ankles); each
  joint's parent is in `parents` (same order), and must be a torso joint or an earlier limb joint, so that grouping
  finds every parent placed before its child. `flip_index` is the mirror permutation of the K points (the centre
  last, mapped to itself).
  """
  num_joints: int
  rjg: Tuple[int, ...]
  ljg_with_hier: Tuple[int, ...]
  ljg_center_only: Tuple[int, ...]
  parents: Tuple[int, ...]
  flip_index: Tuple[int, ...]

  def __post_init__(self):
    every = sorted(self.rjg + self.ljg_with_hier + self.ljg_center_only)
    if every != list(range(self.num_joints)):
      raise ValueError(f"joint groups rjg={self.rjg}, ljg_with_hier={self.ljg_with_hier}, "
                       f"ljg_center_only={self.ljg_center_only} must split joints 0..{self.num_joints - 1} "
                       "exactly once")
    if len(self.parents) != len(self.ljg_with_hier):
      raise ValueError(f"parents {self.parents} must list one parent per ljg_with_hier joint {self.ljg_with_hier}")
    placed = set(self.rjg)
    for joint, parent in zip(self.ljg_with_hier, self.parents):
      if parent not in placed:
        raise ValueError(f"limb joint {joint}: parent {parent} is neither a torso (rjg) joint nor a limb joint "
                         f"processed before it (order {self.ljg_with_hier})")
      placed.add(joint)
    if (sorted(self.flip_index) != list(range(self.num_points)) or self.flip_index[-1] != self.center):
      raise ValueError(f"flip_index {self.flip_index} must permute the {self.num_points} points, centre last")

  @classmethod
  def build(cls, num_joints: int, rjg: Sequence[int], ljg_with_hier: Sequence[int], ljg_center_only: Sequence[int],
            parents: Optional[Sequence[int]] = None, flip_pairs: Sequence[Tuple[int, int]] = (),
            flip_index: Optional[Sequence[int]] = None) -> "JointGroups":
    """With the defaults filled in: each limb joint's parent is joint index - 2 (the original's table in all its
    datasets); the mirror permutation comes from the left/right `flip_pairs` unless `flip_index` gives it whole."""
    num_joints = int(num_joints)
    ljg_with_hier = tuple(int(j) for j in ljg_with_hier)
    if parents is None:
      parents = tuple(j - 2 for j in ljg_with_hier)
    if flip_index is None:
      flip_index = tuple(keypoints_lib.flip_permutation(num_joints, flip_pairs)) + (num_joints,)
    return cls(num_joints=num_joints, rjg=tuple(int(j) for j in rjg), ljg_with_hier=ljg_with_hier,
               ljg_center_only=tuple(int(j) for j in ljg_center_only), parents=tuple(int(p) for p in parents),
               flip_index=tuple(int(i) for i in flip_index))

  @classmethod
  def from_config(cls, config) -> "JointGroups":
    """From a DEM config's `data` section (configs/dem_common.py): `num_joints`, `rjg_tag`, `ljg_with_hier`,
    `ljg_center_only`, `ljg_parents` (default joint - 2, as the original), `flip_index` (else `flip_pairs`)."""
    data = config.data
    missing = [f for f in ("num_joints", "rjg_tag", "ljg_with_hier", "ljg_center_only") if f not in data]
    if missing:
      raise ValueError(f"config.data lacks the DEM joint groups {missing} (see configs/dem_common.py)")
    return cls.build(data.num_joints, data.rjg_tag, data.ljg_with_hier, data.ljg_center_only,
                     parents=data.get("ljg_parents", None) or None, flip_pairs=data.get("flip_pairs", ()),
                     flip_index=data.get("flip_index", None) or None)

  @property
  def num_points(self) -> int:
    """K: joints plus the centre (the last index)."""
    return self.num_joints + 1

  @property
  def center(self) -> int:
    return self.num_joints

  @functools.cached_property
  def offset_layout(self) -> Tuple[OffsetGroup, ...]:
    """The offset channels of each limb / face joint, in channel order (joint index order, torso joints skipped)."""
    layout, channel = [], 0
    for j in range(self.num_joints):
      if j in self.rjg:
        continue
      group = OffsetGroup(j, self.parent_of(j), channel)
      layout.append(group)
      channel += group.num_channels
    return tuple(layout)

  @functools.cached_property
  def _group_of(self) -> Dict[int, OffsetGroup]:
    return {g.joint: g for g in self.offset_layout}

  @functools.cached_property
  def offset_channels(self) -> Dict[int, int]:
    """First offset channel of each limb / face joint."""
    return {g.joint: g.channel for g in self.offset_layout}

  @property
  def num_offsets(self) -> int:
    return sum(g.num_channels for g in self.offset_layout)

  def centre_offset_channels(self, joint: int) -> Tuple[int, int]:
    """(dx, dy) channels of the joint's offset to its person's centre."""
    c = self._group_of[joint].center_channel
    return c + 1, c

  def parent_offset_channels(self, joint: int) -> Tuple[int, int]:
    """(dx, dy) channels of a hierarchical joint's offset to its parent."""
    c = self._group_of[joint].channel
    return c + 1, c

  def parent_of(self, joint: int) -> Optional[int]:
    if joint in self.ljg_with_hier:
      return self.parents[self.ljg_with_hier.index(joint)]
    return None

  def children_of(self, joint: int) -> Tuple[int, ...]:
    return tuple(c for c, p in zip(self.ljg_with_hier, self.parents) if p == joint)

  def flip_permutation(self) -> np.ndarray:
    """(K,) channel permutation of heatmaps and tags after a horizontal mirror (the centre maps to itself)."""
    return np.asarray(self.flip_index, np.int64)

  def offset_flip_permutation(self) -> np.ndarray:
    """(N_off,) channel permutation of the offset maps after a mirror: each joint's channels come from its mirror
    joint's. The dx channels must also change sign (`offset_x_channels`)."""
    perm = np.zeros(self.num_offsets, np.int64)
    for group in self.offset_layout:
      mirror = self._group_of.get(self.flip_index[group.joint])
      if mirror is None or mirror.num_channels != group.num_channels:
        raise ValueError(f"joint {group.joint} and its mirror {self.flip_index[group.joint]} are in different "
                         "joint groups")
      perm[group.channel:group.channel + group.num_channels] = np.arange(
          mirror.channel, mirror.channel + mirror.num_channels)
    return perm

  def offset_x_channels(self) -> np.ndarray:
    """Boolean (N_off,): the dx channels (odd channels; pairs are (dy, dx))."""
    return np.arange(self.num_offsets) % 2 == 1


class DEMCodec:
  """People <-> DEM targets at the configured output resolutions.

  Args:
    num_joints: J, joints of the dataset (the centre is added as point J).
    rjg_tag: root joints, grouped by tags; they have no offset channels.
    ljg_with_hier: limb joints with an offset to their parent and one to the centre (4 channels), in processing
      order (see `JointGroups`).
    ljg_center_only: joints with an offset to the centre only (2 channels).
    flip_pairs: left/right joint pairs of the dataset (the centre maps to itself).
    flip_index: the whole flip permutation with the centre (K entries), instead of `flip_pairs`.
    input_size: side of the square network input.
    output_sizes: sides of the square target maps, one per output resolution (e.g. (128, 256)).
    sigma: Gaussian sigma in output pixels, the same at every resolution.
    max_people: rows of the AE index lists.
    tau: half-size of the offset window.
    ljg_parents: parent of each `ljg_with_hier` joint (same order); default joint - 2.
    original_offset_overlap: reproduce the original last-writer / count overlap (module docstring).
    offsets_to_invisible_parents: reproduce the original offsets to unlabelled parents (module docstring).
    original_map_frame: place people on the maps by scaling input pixels, as the original (module docstring).
  """

  def __init__(self, num_joints: int, rjg_tag: Sequence[int], ljg_with_hier: Sequence[int],
               ljg_center_only: Sequence[int], flip_pairs: Sequence[Tuple[int, int]] = (),
               input_size: int = 512, output_sizes: Sequence[int] = (128, 256), sigma: float = 2.0,
               max_people: int = 30, tau: int = 7, ljg_parents: Optional[Sequence[int]] = None,
               original_offset_overlap: bool = False, offsets_to_invisible_parents: bool = False,
               flip_index: Optional[Sequence[int]] = None, original_map_frame: bool = False):
    self.groups = JointGroups.build(num_joints, rjg_tag, ljg_with_hier, ljg_center_only, parents=ljg_parents,
                                    flip_pairs=flip_pairs, flip_index=flip_index)
    self.num_joints = self.groups.num_joints
    self.num_points = self.groups.num_points
    self.rjg_tag = self.groups.rjg
    self.ljg_with_hier = self.groups.ljg_with_hier
    self.ljg_center_only = self.groups.ljg_center_only
    self.parents: Dict[int, int] = dict(zip(self.groups.ljg_with_hier, self.groups.parents))
    self.offset_layout: Tuple[OffsetGroup, ...] = self.groups.offset_layout
    self.num_offset_channels = self.groups.num_offsets
    self.flip_index = self.groups.flip_permutation()
    self.input_size = int(input_size)
    self.output_sizes = tuple(int(r) for r in output_sizes)
    self.sigma = float(sigma)
    self.max_people = int(max_people)
    self.tau = int(tau)
    self.original_offset_overlap = bool(original_offset_overlap)
    self.offsets_to_invisible_parents = bool(offsets_to_invisible_parents)
    self.original_map_frame = bool(original_map_frame)

    # The original's unnormalised Gaussian: side 6*sigma+3, peak (value 1) at index 3*sigma+1.
    size = 6 * self.sigma + 3
    grid = np.arange(0, size, 1, dtype=np.float64)
    peak = 3 * self.sigma + 1
    self._gaussian = np.exp(-((grid[None, :] - peak) ** 2 + (grid[:, None] - peak) ** 2)
                            / (2 * self.sigma ** 2)).astype(np.float32)

  @classmethod
  def from_config(cls, config) -> "DEMCodec":
    """Builds the codec from a DEM experiment config (`config.data`, see configs/dem_common.py).

    Reads the joint groups as `JointGroups.from_config` does, then `image_size`, `output_size`, `sigma`,
    `offset_radius`, `max_num_people` and the reproduction flags `original_offset_overlap`,
    `offsets_to_invisible_parents` and `original_map_frame` (default False).
    """
    groups = JointGroups.from_config(config)
    data = config.data
    size = data.image_size
    input_size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    if isinstance(size, (tuple, list)) and int(size[0]) != int(size[1]):
      raise ValueError(f"config.data.image_size {tuple(size)} must be square for bottom-up training")
    return cls(
        num_joints=groups.num_joints,
        rjg_tag=groups.rjg,
        ljg_with_hier=groups.ljg_with_hier,
        ljg_center_only=groups.ljg_center_only,
        ljg_parents=groups.parents,
        flip_index=groups.flip_index,
        input_size=input_size,
        output_sizes=tuple(int(r) for r in data.output_size),
        sigma=float(data.sigma),
        max_people=int(data.get("max_num_people", 30)),
        tau=int(data.get("offset_radius", 7)),
        original_offset_overlap=bool(data.get("original_offset_overlap", False)),
        offsets_to_invisible_parents=bool(data.get("offsets_to_invisible_parents", False)),
        original_map_frame=bool(data.get("original_map_frame", False)),
    )

  # ---------------------------------------------------------------------------------------------- people

  def add_centers(self, keypoints: np.ndarray) -> np.ndarray:
    """(N, J, 3) keypoints -> (N, K, 3) with the person centre appended.

    The centre is the mean of the labelled (v > 0) keypoints; its v is 1 when at least one keypoint is labelled.
    (The original sums all J positions; unlabelled COCO/CrowdPose keypoints are (0, 0, 0), so both agree there.)
    """
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, self.num_joints, 3)
    labelled = keypoints[:, :, 2] > 0
    count = labelled.sum(axis=1)
    total = (keypoints[:, :, :2] * labelled[:, :, None]).sum(axis=1)
    center = np.zeros((keypoints.shape[0], 1, 3))
    has = count > 0
    center[has, 0, :2] = total[has] / count[has, None]
    center[has, 0, 2] = 1.0
    return np.concatenate([keypoints, center], axis=1)

  def map_frame(self, resolution: int, input_size: Optional[int] = None) -> np.ndarray:
    """2x3 affine from input pixels to the pixels of the maps at `resolution` (module docstring); `input_size`
    (default the codec's) is the input side the maps' side belongs to."""
    ratio = resolution / float(input_size or self.input_size)
    shift = 0.0 if self.original_map_frame else 0.5 * ratio - 0.5
    return np.array([[ratio, 0.0, shift], [0.0, ratio, shift]])

  def to_resolution(self, people: np.ndarray, resolution: int, input_size: Optional[int] = None) -> np.ndarray:
    """People in input pixels -> people in the pixels of an r x r map (`map_frame`, same arguments)."""
    people = np.array(people, dtype=np.float64, copy=True)
    frame = self.map_frame(resolution, input_size)
    people[..., :2] = people[..., :2] * frame[0, 0] + frame[0, 2]
    return people

  def flip_people(self, people: np.ndarray, resolution: int) -> np.ndarray:
    """Horizontal mirror of people on an r x r map: x <- r - 1 - x, joints re-indexed by the flip index (the
    mirror of the input image in `map_frame`, unless `original_map_frame`)."""
    people = np.array(people, dtype=np.float64, copy=True)[:, self.flip_index]
    people[..., 0] = resolution - 1 - people[..., 0]
    return people

  def _inside(self, people: np.ndarray, resolution: int):
    """Integer positions (truncated toward zero) and whether each labelled point lands on the map."""
    xy = np.trunc(people[..., :2]).astype(np.int64)
    ok = ((people[..., 2] > 0) & (xy[..., 0] >= 0) & (xy[..., 1] >= 0)
          & (xy[..., 0] < resolution) & (xy[..., 1] < resolution))
    return xy, ok

  # ---------------------------------------------------------------------------------------------- targets

  def heatmaps(self, people: np.ndarray, resolution: int) -> np.ndarray:
    """(N, K, 3) people at resolution r -> (r, r, K) Gaussian heatmaps, merged by max."""
    people = np.asarray(people, dtype=np.float64).reshape(-1, self.num_points, 3)
    r = int(resolution)
    maps = np.zeros((r, r, self.num_points), dtype=np.float32)
    xy, ok = self._inside(people, r)
    g = self._gaussian
    s = self.sigma
    for n, k in zip(*np.nonzero(ok)):
      x, y = xy[n, k]
      ul = int(np.round(x - 3 * s - 1)), int(np.round(y - 3 * s - 1))
      br = int(np.round(x + 3 * s + 2)), int(np.round(y + 3 * s + 2))
      gx0, gx1 = max(0, -ul[0]), min(br[0], r) - ul[0]
      gy0, gy1 = max(0, -ul[1]), min(br[1], r) - ul[1]
      mx0, mx1 = max(0, ul[0]), min(br[0], r)
      my0, my1 = max(0, ul[1]), min(br[1], r)
      window = maps[my0:my1, mx0:mx1, k]
      np.maximum(window, g[gy0:gy1, gx0:gx1], out=window)
    return maps

  def offset_norm(self, resolution: int) -> float:
    """Z: offsets are stored divided by the diagonal of the r x r map."""
    return math.sqrt(2.0 * resolution ** 2)

  def offsets(self, people: np.ndarray, resolution: int, return_counts: bool = False):
    """(N, K, 3) people at resolution r -> (r, r, C) Local-Embedding offset targets (module docstring: fixes).

    In each joint's (2 tau + 1)^2 window (clipped to the map) a channel pair holds (T_y - v, T_x - u) / Z at pixel
    (u, v), T being the person centre or the parent joint (raw coordinates, which may lie off the map).
    With `return_counts` also returns the per-channel number of people that wrote each pixel.
    """
    people = np.asarray(people, dtype=np.float64).reshape(-1, self.num_points, 3)
    r = int(resolution)
    z = self.offset_norm(r)
    tau = self.tau
    sums = np.zeros((r, r, self.num_offset_channels), dtype=np.float32)
    counts = np.zeros((r, r, self.num_offset_channels), dtype=np.float32)
    xy, ok = self._inside(people, r)
    center = self.num_points - 1
    overwrite = self.original_offset_overlap
    for group in self.offset_layout:
      j, c = group.joint, group.channel
      for n in np.nonzero(ok[:, j])[0]:
        x, y = xy[n, j]
        x0, x1 = max(0, x - tau), min(r, x + tau + 1)
        y0, y1 = max(0, y - tau), min(r, y + tau + 1)
        rows = np.arange(y0, y1, dtype=np.float64)[:, None]
        cols = np.arange(x0, x1, dtype=np.float64)[None, :]
        pairs = []
        if group.parent is not None:
          px, py, pv = people[n, group.parent]
          parent_ok = 0 <= px < r and 0 <= py < r
          if not self.offsets_to_invisible_parents:
            parent_ok = parent_ok and pv > 0
          if parent_ok:
            pairs.append((c, px, py, overwrite))
        if people[n, center, 2] > 0:
          # Centre-only channels always accumulated in the original; the limb joints' centre pair overwrote.
          pairs.append((group.center_channel, people[n, center, 0], people[n, center, 1],
                        overwrite and group.parent is not None))
        for ch, tx, ty, replace in pairs:
          dy = np.broadcast_to((ty - rows) / z, (y1 - y0, x1 - x0))
          dx = np.broadcast_to((tx - cols) / z, (y1 - y0, x1 - x0))
          if replace:
            sums[y0:y1, x0:x1, ch] = dy
            sums[y0:y1, x0:x1, ch + 1] = dx
          else:
            sums[y0:y1, x0:x1, ch] += dy
            sums[y0:y1, x0:x1, ch + 1] += dx
          counts[y0:y1, x0:x1, ch:ch + 2] += 1
    written = counts.astype(np.int32) if return_counts else None
    np.maximum(counts, 1.0, out=counts)
    sums /= counts
    if return_counts:
      return sums, written
    return sums

  def ae_index_list(self, people: np.ndarray, resolution: int) -> np.ndarray:
    """(N, K, 3) people -> (max_people, K, 2) int32 rows of (k * r^2 + y * r + x, 1).

    Every labelled point on the map is listed (all joints and the centre). People with no such point take no row,
    and people beyond `max_people` listed ones are left out of the AE loss (the original raised an IndexError);
    they still get heatmaps and offsets.
    """
    people = np.asarray(people, dtype=np.float64).reshape(-1, self.num_points, 3)
    r = int(resolution)
    out = np.zeros((self.max_people, self.num_points, 2), dtype=np.int32)
    xy, ok = self._inside(people, r)
    row = 0
    for n in range(people.shape[0]):
      ks = np.nonzero(ok[n])[0]
      if ks.size == 0:
        continue
      if row == self.max_people:
        break
      out[row, :ks.size, 0] = ks * r * r + xy[n, ks, 1] * r + xy[n, ks, 0]
      out[row, :ks.size, 1] = 1
      row += 1
    return out

  def encode(self, people_per_resolution: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """People at each output resolution -> the training targets of one sample.

    Returns `heatmaps_i` (r_i, r_i, K) float32, `offsets_i` (r_i, r_i, C) float32 and `joints_i`
    (max_people, K, 2) int32 for each resolution index i.
    """
    if len(people_per_resolution) != len(self.output_sizes):
      raise ValueError(f"got people at {len(people_per_resolution)} resolutions, the codec has "
                       f"{len(self.output_sizes)} ({self.output_sizes})")
    targets = {}
    for i, (people, r) in enumerate(zip(people_per_resolution, self.output_sizes)):
      targets[f"heatmaps_{i}"] = self.heatmaps(people, r)
      targets[f"offsets_{i}"] = self.offsets(people, r)
      targets[f"joints_{i}"] = self.ae_index_list(people, r)
    return targets

  # ---------------------------------------------------------------------------------------------- maps

  @property
  def offset_flip_permutation(self) -> np.ndarray:
    """Channel index array: offset channels of a mirrored map come from the mirror joint's group."""
    return self.groups.offset_flip_permutation()

  @property
  def offset_x_channels(self) -> np.ndarray:
    """Boolean mask of the Delta-x channels (odd channels: each pair is (Delta-y, Delta-x))."""
    return self.groups.offset_x_channels()

  def flip_heatmaps(self, maps: np.ndarray) -> np.ndarray:
    """Mirror (..., H, W, K) heatmaps or tag maps: reverse W and swap left/right channels."""
    return np.asarray(maps)[..., ::-1, :][..., self.flip_index]

  def flip_offsets(self, maps: np.ndarray) -> np.ndarray:
    """Mirror (..., H, W, C) offset maps: reverse W, swap mirror groups and negate Delta-x."""
    maps = np.asarray(maps)[..., ::-1, :][..., self.offset_flip_permutation]
    return np.where(self.offset_x_channels, -maps, maps)

  def tag_maps(self, people: np.ndarray, resolution: int, person_tags: Sequence[float]) -> np.ndarray:
    """Ideal tag maps (r, r, K): each pixel of a point's Gaussian window holds the tag of the person whose Gaussian
    is largest there (the first person on ties), 0 elsewhere. For testing grouping on rendered outputs."""
    people = np.asarray(people, dtype=np.float64).reshape(-1, self.num_points, 3)
    r = int(resolution)
    best = np.zeros((r, r, self.num_points), dtype=np.float32)
    tags = np.zeros((r, r, self.num_points), dtype=np.float32)
    for n in range(people.shape[0]):
      single = self.heatmaps(people[n:n + 1], r)
      win = single > best
      tags[win] = person_tags[n]
      best = np.maximum(best, single)
    return tags

  def render_outputs(self, people_input: np.ndarray, person_tags: Sequence[float]):
    """Ideal network outputs for people given in input pixels, batch of one, NHWC, in the model's order:
    (offsets at output_sizes[0], offsets at output_sizes[1], heatmaps+tags at output_sizes[0], heatmaps at
    output_sizes[1]). Useful to test grouping and decoding without a trained network."""
    if len(self.output_sizes) != 2:
      raise ValueError(f"render_outputs needs two output sizes, got {self.output_sizes}")
    r0, r1 = self.output_sizes
    p0 = self.to_resolution(people_input, r0)
    p1 = self.to_resolution(people_input, r1)
    quarter = np.concatenate([self.heatmaps(p0, r0), self.tag_maps(p0, r0, person_tags)], axis=-1)
    return (self.offsets(p0, r0)[None], self.offsets(p1, r1)[None], quarter[None], self.heatmaps(p1, r1)[None])
