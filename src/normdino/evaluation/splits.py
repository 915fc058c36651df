"""Out-of-sample calibration: which healthy images may set the thresholds applied to which evaluated images.

Slices of one volume are near copies of each other, so images are grouped by *source volume / patient*
(:func:`group_key`) and no group is split:

* healthy calibration images of a group that is also in training are dropped (with a warning);
* when the healthy calibration images and the evaluated images share groups (lgg-flair evaluates on its
  ``valid`` split, whose healthy slices also set the thresholds), the groups are split into two folds and
  each fold is evaluated with thresholds set on the healthy images of the *other* fold (cross-fitting):
  every image is scored, and never with thresholds its own patient helped to set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from normdino.errors import InputError
from normdino.io.inputs import group_key

log = logging.getLogger(__name__)

__all__ = ["group_key", "CalibrationFolds", "calibration_folds", "drop_training_groups", "without_training_patients"]

@dataclass(frozen=True)
class CalibrationFolds:
    """Fold of every healthy calibration image and of every evaluated image; thresholds of fold k come from
    the healthy images of the other folds (or of all of them when there is one fold)."""

    healthy: tuple[int, ...]
    evaluation: tuple[int, ...]
    n_folds: int
    description: str

    def calibrates(self, healthy_index: int, fold: int) -> bool:
        """Whether healthy image ``healthy_index`` helps set the thresholds used on fold ``fold``."""
        return self.n_folds == 1 or self.healthy[healthy_index] != fold


def calibration_folds(healthy: Sequence[Path], evaluation: Sequence[Path], seed: int = 0) -> CalibrationFolds:
    """One fold when no patient is in both lists, else two folds of patients (seeded, balanced by healthy count)."""
    healthy_groups = [group_key(p) for p in healthy]
    evaluation_groups = [group_key(p) for p in evaluation]
    shared = set(healthy_groups) & set(evaluation_groups)
    if not shared:
        return CalibrationFolds((0,) * len(healthy), (0,) * len(evaluation), 1,
                                "out-of-sample: healthy calibration images and evaluated images share no patient")
    groups = sorted(set(healthy_groups) | set(evaluation_groups))
    healthy_count = {g: healthy_groups.count(g) for g in groups}
    calibrating = [g for g in groups if healthy_count[g] > 0]
    if len(calibrating) < 2:
        log.warning("Only one patient/volume has healthy calibration images; thresholds are set IN-SAMPLE "
                    "(on images that are also scored): FPRs will look better than they are.")
        return CalibrationFolds((0,) * len(healthy), (0,) * len(evaluation), 1,
                                "IN-SAMPLE (one patient with healthy images): optimistic thresholds")
    order = np.random.default_rng(seed).permutation(len(calibrating))
    fold_of, load = {}, [0, 0]
    for i in sorted(order, key=lambda i: -healthy_count[calibrating[i]]):  # greedy balance, seeded tie order
        fold = int(np.argmin(load))
        fold_of[calibrating[i]] = fold
        load[fold] += healthy_count[calibrating[i]]
    rng = np.random.default_rng(seed + 1)
    for g in groups:
        fold_of.setdefault(g, int(rng.integers(2)))
    return CalibrationFolds(tuple(fold_of[g] for g in healthy_groups), tuple(fold_of[g] for g in evaluation_groups), 2,
                            f"out-of-sample by patient: 2 folds of {len(groups)} patients/volumes, each evaluated "
                            "with thresholds from the other fold's healthy images")


def drop_training_groups(healthy: Sequence, train: Sequence[Path], path_of=lambda s: s.image) -> list:
    """The healthy calibration items whose patient/volume is not in training (warns about any dropped)."""
    train_groups = {group_key(p) for p in train}
    kept = [h for h in healthy if group_key(path_of(h)) not in train_groups]
    if len(kept) < len(healthy):
        log.warning("%d healthy calibration images come from patients/volumes that are also in training; "
                    "they are left out of calibration (split by patient, not by slice).", len(healthy) - len(kept))
    if healthy and not kept:
        raise InputError("every healthy calibration image comes from a training patient/volume; "
                         "hold out whole patients for calibration")
    return kept


def without_training_patients(dataset, train: Sequence[Path]):
    """A copy of ``dataset`` whose healthy validation/test images exclude patients/volumes also in ``train``.

    Those slices would set thresholds (and be scored) on near copies of training slices: optimistic FPRs.
    """
    import dataclasses

    train_groups = {group_key(p) for p in train}

    def keep(samples: list) -> list:
        return [s for s in samples if s.label == 1 or group_key(s.image) not in train_groups]

    trimmed = dataclasses.replace(dataset, valid=keep(dataset.valid), test=keep(dataset.test))
    dropped = len(dataset.valid) + len(dataset.test) - len(trimmed.valid) - len(trimmed.test)
    if dropped:
        log.warning("%d healthy validation/test images come from patients/volumes that are also in training; "
                    "they are left out (split by patient, not by slice).", dropped)
    if dataset.healthy_validation and not trimmed.healthy_validation:
        raise InputError("every healthy validation image comes from a training patient/volume; "
                         "hold out whole patients for calibration")
    return trimmed
