"""Keypoints <-> training targets and back: one object encodes and decodes, so training and testing agree."""
