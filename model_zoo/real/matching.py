"""Comparison primitives for task metrics: box IoU, IoU-matched F1, edit distance.

Boxes are ``float`` arrays of shape ``[n, 4]`` holding ``(x0, y0, x1, y1)`` corners in
pixels. The metrics compare a *reference* set (the original model's answer) with a
*candidate* set (the compressed model's answer) for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union, shape ``[len(boxes_a), len(boxes_b)]``."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


@dataclass
class MatchCounts:
    """Running totals of an IoU matching over many images."""

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    matched_iou_sum: float = 0.0

    def add(self, other: MatchCounts) -> None:
        """Accumulate another image's counts into this one."""
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        self.matched_iou_sum += other.matched_iou_sum

    @property
    def precision(self) -> float:
        """Matched candidate boxes over all candidate boxes (1.0 when there are none)."""
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        """Matched reference boxes over all reference boxes (1.0 when there are none)."""
        expected = self.true_positives + self.false_negatives
        return self.true_positives / expected if expected else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall; 1.0 when both sets are empty."""
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else 1.0

    @property
    def mean_matched_iou(self) -> float:
        """Average IoU of matched pairs (1.0 when nothing was there to match)."""
        if self.true_positives == 0:
            return 1.0 if self.false_positives + self.false_negatives == 0 else 0.0
        return self.matched_iou_sum / self.true_positives


def match_boxes(
    reference_boxes: np.ndarray,
    candidate_boxes: np.ndarray,
    *,
    min_iou: float = 0.5,
    reference_labels: np.ndarray | None = None,
    candidate_labels: np.ndarray | None = None,
) -> tuple[MatchCounts, list[tuple[int, int]]]:
    """Greedy one-to-one matching by descending IoU (pairs below ``min_iou`` never match).

    When labels are given, only boxes with equal labels can match. Returns the counts
    and the matched ``(reference_index, candidate_index)`` pairs.
    """
    reference = np.asarray(reference_boxes, dtype=np.float64).reshape(-1, 4)
    candidate = np.asarray(candidate_boxes, dtype=np.float64).reshape(-1, 4)
    iou = box_iou(reference, candidate)
    if reference_labels is not None and candidate_labels is not None:
        same = np.asarray(reference_labels)[:, None] == np.asarray(candidate_labels)[None, :]
        iou = np.where(same, iou, 0.0)
    pairs: list[tuple[int, int]] = []
    iou_sum = 0.0
    if iou.size:
        rows, cols = np.nonzero(iou >= min_iou)
        order = np.argsort(-iou[rows, cols], kind="stable")
        used_reference: set[int] = set()
        used_candidate: set[int] = set()
        for position in order:
            r, c = int(rows[position]), int(cols[position])
            if r in used_reference or c in used_candidate:
                continue
            used_reference.add(r)
            used_candidate.add(c)
            pairs.append((r, c))
            iou_sum += float(iou[r, c])
    counts = MatchCounts(
        true_positives=len(pairs),
        false_positives=len(candidate) - len(pairs),
        false_negatives=len(reference) - len(pairs),
        matched_iou_sum=iou_sum,
    )
    return counts, pairs


def edit_distance(reference: str, candidate: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(candidate) + 1))
    for i, ref_char in enumerate(reference, start=1):
        current = [i]
        for j, cand_char in enumerate(candidate, start=1):
            current.append(min(
                previous[j] + 1,
                current[j - 1] + 1,
                previous[j - 1] + (ref_char != cand_char),
            ))
        previous = current
    return previous[-1]
