"""COCO-format keypoint datasets (COCO, CrowdPose, OCHuman, custom sets): top-down person records and bottom-up
image records, both read by one image / annotation reader with one set of checks.

Any COCO-format keypoint file works by config alone: `data.num_joints`, `data.flip_pairs`, `data.oks_sigmas` describe
the keypoint convention, and `data.category_id` (default: the first category of the file, as the original) picks the
person category. The record rule is the original EEffPose's:
  * non-crowd annotations of the person category with area > 0 whose box, clipped to the image as
    x1 = max(0, x), y1 = max(0, y), x2 = min(W-1, x1 + max(0, w-1)), y2 = min(H-1, y1 + max(0, h-1)),
    has x2 >= x1 and y2 >= y1; annotations whose keypoint list is all zeros are left out;
  * visibility v > 1 counts as 1;
  * the clipped box [x1, y1, x2-x1, y2-y1] gives center/scale (aspect fix to the input W/H, x1.25 padding).
Annotations without an 'area' field (CrowdPose) use the box area w*h for the record; their box is then checked for
zero area as below, rather than left out by the area test.

The bottom-up records (`load_image_records`) are whole images with every person of the person category.

Bad data that the rules would turn into a wrong crop or target is an error naming the file and record (or a counted
skip with `data.skip_bad_records`): a malformed image entry or annotation (missing or non-numeric fields), a keypoint
list of the wrong length, a box of zero area (w <= 0 or h <= 0, or a clipped box that collapses to a point), a
missing image file.
"""
import contextlib
import io
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from pycocotools.coco import COCO

from data_pipelines import records as records_lib
from data_pipelines.records import BadRecordError, SkipReport


def read_json(path: str) -> Any:
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise BadRecordError(f"{path}: annotation file not found") from None
  except json.JSONDecodeError as e:
    raise BadRecordError(f"{path}: not valid JSON ({e})") from None


def load_coco(annotation_file: str, report: Optional[SkipReport] = None) -> COCO:
  """Reads a COCO-format json into pycocotools' COCO, checking the fields the index needs first."""
  dataset = read_json(annotation_file)
  if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list) \
      or not isinstance(dataset.get("annotations"), list):
    raise BadRecordError(f"{annotation_file}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
  images = []
  for i, img in enumerate(dataset["images"]):
    missing = [k for k in ("id", "file_name") if not isinstance(img, dict) or k not in img]
    if missing:
      message = f"{annotation_file}: images[{i}] is malformed (missing {', '.join(missing)})"
      if report is None:
        raise BadRecordError(message)
      report.bad(message, "malformed image entry")
      continue
    images.append(img)
  annotations = []
  for i, ann in enumerate(dataset["annotations"]):
    missing = [k for k in ("id", "image_id", "category_id") if not isinstance(ann, dict) or k not in ann]
    if missing:
      ident = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
      message = f"{annotation_file}: annotation {ident} (annotations[{i}]) is malformed (missing {', '.join(missing)})"
      if report is None:
        raise BadRecordError(message)
      report.bad(message, "malformed annotation")
      continue
    annotations.append(ann)
  dataset = dict(dataset, images=images, annotations=annotations)
  dataset.setdefault("categories", [])
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
    coco.createIndex()
  return coco


def person_category(coco: COCO, data_config) -> int:
  """The category whose annotations are people: `data.category_id`, else the file's first category (as HRNet)."""
  category_id = data_config.get("category_id", None)
  if category_id is not None and int(category_id) >= 0:
    return int(category_id)
  ids = coco.getCatIds()
  return int(ids[0]) if ids else 1


def clip_box(box, width: float, height: float):
  """The original's box sanitising: returns [x1, y1, x2-x1, y2-y1], or None when it is empty."""
  x, y, w, h = box
  x1 = max(0.0, x)
  y1 = max(0.0, y)
  x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
  y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
  if x2 >= x1 and y2 >= y1:
    return [x1, y1, x2 - x1, y2 - y1]
  return None


def load_coco_records(annotation_file: str, image_dir: str, data_config, *, train: bool,
                      report: Optional[SkipReport] = None, check_files: bool = True) -> List[Dict[str, Any]]:
  """Ground-truth person records of a COCO-format keypoint file, by the record rule of this module's docstring.

  `train` names the split in messages; the rule is the same for both, as in the original (its GT-box evaluation uses
  the training rule). Images are visited in file order, annotations in file order within an image.
  `report` collects skips when `data.skip_bad_records` is set (one is made and logged when not given).
  """
  split = "train" if train else "val"
  own_report = report is None
  if own_report:
    report = SkipReport(f"{annotation_file} ({split})", records_lib.skip_bad_records(data_config))
  coco = load_coco(annotation_file, report)
  num_joints = int(data_config.num_joints)
  image_dir = os.path.abspath(image_dir)
  records: List[Dict[str, Any]] = []
  for where, img, annotations in image_entries(coco, annotation_file, data_config, report):
    width, height = img["width"], img["height"]
    image_file = os.path.join(image_dir, img["file_name"])
    image_records = []
    for ann in annotations:
      if ann.get("iscrowd", 0):
        continue
      rec = _annotation_record(ann, where, width, height, image_file, num_joints, data_config, report)
      if rec is not None:
        image_records.append(rec)
    if image_records and check_files and not os.path.isfile(image_file):
      report.bad(f"{where}: image file {image_file} does not exist ({len(image_records)} persons)", "missing image",
                 count=len(image_records))
      continue
    records.extend(image_records)
  if own_report:
    report.log()
  return records


def image_entries(coco: COCO, annotation_file: str, data_config, report: SkipReport, *,
                  with_people_only: bool = False) -> Iterator[Tuple[str, Dict[str, Any], List[Dict[str, Any]]]]:
  """The images of a COCO-format file in file order, each with its annotations of the person category (file order)
  and a name for messages: (where, image entry, annotations). Images whose width/height are missing or not positive
  go to `report`; `with_people_only` leaves out, unchecked, the images with no person annotation."""
  category = person_category(coco, data_config)
  for image_id in coco.getImgIds():
    img = coco.imgs[image_id]
    annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["category_id"] == category]
    if with_people_only and not annotations:
      continue
    where = f"{annotation_file}: image {image_id} ({img['file_name']})"
    if not (finite_pos(img.get("width")) and finite_pos(img.get("height"))):
      report.bad(f"{where}: fields 'width'/'height' missing or not positive", "malformed image entry")
      continue
    yield where, img, annotations


def person_keypoints(ann: Dict[str, Any], ident: str, num_joints: int, report: SkipReport) -> Optional[np.ndarray]:
  """The `keypoints` of an annotation as (num_joints, 3) float64 (x, y, v), or None when missing or malformed
  (reported to `report`, `ident` naming the annotation)."""
  keypoints = ann.get("keypoints")
  if keypoints is None:
    report.bad(f"{ident}: field 'keypoints' is missing", "malformed annotation")
    return None
  if not records_lib.finite_numbers(keypoints):
    report.bad(f"{ident}: field 'keypoints' must be a list of finite numbers", "malformed annotation")
    return None
  if len(keypoints) != 3 * num_joints:
    report.bad(f"{ident}: field 'keypoints' has {len(keypoints)} values, expected {3 * num_joints} "
               f"(3 x {num_joints} joints)", "keypoint list of the wrong length")
    return None
  return np.asarray(keypoints, dtype=np.float64).reshape(num_joints, 3)


def load_image_records(annotation_file: str, image_dir: str, data_config, *, train: bool,
                       report: Optional[SkipReport] = None, check_files: bool = True) -> List[Dict[str, Any]]:
  """Bottom-up records of a COCO-format keypoint file: one per image, in file order, with file (`image_dir` joined
  with the file name), image_id, height, width and keypoints (N, J, 3) in the network's joint order
  (`data.joint_order`).

  Training (`train`): the images with at least one annotation of the person category (the original's training set);
  the people are the annotations with `iscrowd == 0` or `num_keypoints > 0`, keypoints float32; `segmentations`
  lists the regions the loss ignores, those of crowds and of people without keypoints. Evaluation: every image,
  also those without people; the people are the non-crowd annotations, the ones the metric scores, keypoints
  float64. An image with a malformed annotation is bad as a whole.
  """
  own_report = report is None
  if own_report:
    report = SkipReport(f"{annotation_file} ({'train' if train else 'val'})", records_lib.skip_bad_records(data_config))
  coco = load_coco(annotation_file, report)
  joint_order = list(data_config.get("joint_order", ()) or ())
  num_annotated = len(joint_order) if joint_order else int(data_config.num_joints)
  records: List[Dict[str, Any]] = []
  for where, img, annotations in image_entries(coco, annotation_file, data_config, report, with_people_only=train):
    people, masked, bad = [], [], False
    for ann in annotations:
      crowd = bool(ann.get("iscrowd", 0))
      if crowd and not train:
        continue
      kpts = None
      if not crowd or ann.get("keypoints") is not None:   # a crowd region needs no keypoints
        kpts = person_keypoints(ann, f"{where}, annotation {ann['id']}", num_annotated, report)
        if kpts is None:
          bad = True
          break
      if not train:
        people.append(kpts)
        continue
      num_kpts = ann.get("num_keypoints")
      if num_kpts is None:
        num_kpts = 0 if kpts is None else int(np.count_nonzero(kpts[:, 2] > 0))
      if crowd or num_kpts == 0:
        if ann.get("segmentation"):
          masked.append(ann["segmentation"])
      if (not crowd or num_kpts > 0) and kpts is not None:
        people.append(kpts)
    if bad:
      continue
    image_file = os.path.join(image_dir, img["file_name"])
    if check_files and not os.path.isfile(image_file):
      report.bad(f"{where}: image file {image_file} does not exist", "missing image")
      continue
    keypoints = np.asarray([p[joint_order] if joint_order else p for p in people], np.float32 if train else np.float64)
    record = dict(file=image_file, image_id=img["id"], height=int(img["height"]), width=int(img["width"]),
                  keypoints=keypoints.reshape(-1, num_annotated, 3))
    if train:
      record["segmentations"] = masked
    records.append(record)
  if own_report:
    report.log()
  return records


def finite_pos(v) -> bool:
  return records_lib.finite_numbers([v]) and v > 0


def _annotation_record(ann, where, width, height, image_file, num_joints, data_config, report):
  """One annotation -> a record, None when the original's rule leaves it out or it is bad (and skipped)."""
  ident = f"{where}, annotation {ann['id']}"
  box = ann.get("bbox")
  if not records_lib.finite_numbers(box, 4):
    report.bad(f"{ident}: field 'bbox' must be 4 finite numbers, got {box!r}", "malformed annotation")
    return None
  kp = person_keypoints(ann, ident, num_joints, report)
  if kp is None:
    return None
  area = ann.get("area", box[2] * box[3])
  if not records_lib.finite_numbers([area]):
    report.bad(f"{ident}: field 'area' is not a finite number", "malformed annotation")
    return None
  # The original's filter: these are ordinary COCO annotations, left out without counting. An area derived from the
  # box is not a fact of the annotation: a zero-area box must reach the check below.
  clean = clip_box(box, width, height)
  if ("area" in ann and area <= 0) or clean is None or kp.max() == 0:
    return None
  if box[2] <= 0 or box[3] <= 0 or (clean[2] <= 0 and clean[3] <= 0):
    report.bad(f"{ident}: field 'bbox' {box} has zero area", "zero-area box")
    return None
  if (kp[:, 2] < 0).any():
    report.bad(f"{ident}: field 'keypoints' has a negative visibility flag", "malformed annotation")
    return None
  visible = np.minimum(kp[:, 2], 1.0)
  center, scale = records_lib.center_scale_from_box(clean, data_config)
  return records_lib.make_record(
      image_file=image_file, image_id=ann["image_id"], center=center, scale=scale, score=1.0,
      joints=kp[:, :2], visible=visible, bbox=clean, area=area, image_size=(width, height),
      annotation_id=ann["id"])


def load_detection_records(det_file: str, annotation_file: Optional[str], image_dir: str, data_config,
                           score_threshold: float, report: Optional[SkipReport] = None,
                           check_files: bool = True) -> List[Dict[str, Any]]:
  """Person detections (`COCO_val2017_detections_AP_H_56_person.json` format) as records for evaluation.

  As the original: only the person category, drop boxes with score < `score_threshold`, the unclipped box
  gives center/scale with the same rule; the score is kept for rescoring. Joints are zero and not visible; `area` is
  the box area. Image files come from `annotation_file`'s image entries (by image_id), or are `%012d.jpg` when it is
  None. A detection of zero area or for an unknown image is bad data.
  """
  own_report = report is None
  if own_report:
    report = SkipReport(f"{det_file} (detections)", records_lib.skip_bad_records(data_config))
  detections = read_json(det_file)
  if not isinstance(detections, list):
    raise BadRecordError(f"{det_file}: expected a list of detections")
  num_joints = int(data_config.num_joints)
  image_dir = os.path.abspath(image_dir)
  images: Dict[int, Dict[str, Any]] = {}
  category = data_config.get("category_id", None)
  if annotation_file:
    coco = load_coco(annotation_file)
    images = coco.imgs
    category = person_category(coco, data_config)
  category = 1 if category is None or int(category) < 0 else int(category)
  records = []
  exists: Dict[str, bool] = {}
  for i, det in enumerate(detections):
    ident = f"{det_file}: detection {i}"
    if not isinstance(det, dict) or any(k not in det for k in ("image_id", "category_id", "bbox", "score")):
      report.bad(f"{ident}: malformed (needs image_id, category_id, bbox, score)", "malformed detection")
      continue
    if det["category_id"] != category:
      continue
    score, box = det["score"], det["bbox"]
    if not records_lib.finite_numbers([score]) or not records_lib.finite_numbers(box, 4):
      report.bad(f"{ident} (image {det['image_id']}): 'score'/'bbox' must be finite numbers", "malformed detection")
      continue
    if score < score_threshold:
      continue
    if box[2] <= 0 or box[3] <= 0:
      report.bad(f"{ident} (image {det['image_id']}): field 'bbox' {box} has zero area", "zero-area box")
      continue
    if annotation_file:
      img = images.get(det["image_id"])
      if img is None:
        report.bad(f"{ident}: image_id {det['image_id']} is not in {annotation_file}", "unknown image")
        continue
      image_file, size = os.path.join(image_dir, img["file_name"]), (img.get("width", 0), img.get("height", 0))
    else:
      image_file, size = os.path.join(image_dir, "%012d.jpg" % int(det["image_id"])), (0, 0)
    if check_files:
      if image_file not in exists:
        exists[image_file] = os.path.isfile(image_file)
      if not exists[image_file]:
        report.bad(f"{ident}: image file {image_file} does not exist", "missing image")
        continue
    center, scale = records_lib.center_scale_from_box(box, data_config)
    records.append(records_lib.make_record(
        image_file=image_file, image_id=det["image_id"], center=center, scale=scale, score=score,
        joints=np.zeros((num_joints, 2)), visible=np.zeros(num_joints), bbox=box, area=box[2] * box[3],
        image_size=size))
  if own_report:
    report.log()
  return records
