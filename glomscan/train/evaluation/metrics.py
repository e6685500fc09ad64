"""Metrics as the paper reports them (pixel-wise per class) plus per-glomerulus detection and the
per-slide sclerosis percentage error."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ...labels import NORMAL, SCLEROSED, UNKNOWN_CLASS
from ...postprocess import EIGHT_CONNECTED

CLASS_KEYS = ("normal", "sclerosed")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def pixel_metrics(tp, fp, fn) -> dict:
    """Per class and mean: precision TP/(TP+FP), recall TP/(TP+FN), F1, Dice 2TP/(2TP+FP+FN).
    (For pixel counts F1 and Dice coincide; both are reported, as in the paper's tables.)"""
    out = {}
    for c, key in enumerate(CLASS_KEYS):
        p = _ratio(tp[c], tp[c] + fp[c])
        r = _ratio(tp[c], tp[c] + fn[c])
        out[f"precision_{key}"] = p
        out[f"recall_{key}"] = r
        out[f"f1_{key}"] = _ratio(2 * p * r, p + r) if not (np.isnan(p) or np.isnan(r)) else float("nan")
        out[f"dice_{key}"] = _ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c])
    for m in ("precision", "recall", "f1", "dice"):
        defined = [out[f"{m}_{k}"] for k in CLASS_KEYS if not np.isnan(out[f"{m}_{k}"])]
        out[f"{m}_mean"] = float(np.mean(defined)) if defined else float("nan")
    return out


def confusion_counts(pred_labels: np.ndarray, true_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per class (labels 1 normal, 2 sclerosed) of two label images."""
    tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
    for c in range(2):
        p, t = pred_labels == c + 1, true_labels == c + 1
        tp[c], fp[c], fn[c] = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
    return tp, fp, fn


def known_class_counts(pred_labels: np.ndarray, true_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``confusion_counts`` over the pixels whose true class is known: glomeruli of unknown
    class (label 3) count for detection and glomerulus-vs-background only."""
    known = true_labels != UNKNOWN_CLASS
    return confusion_counts(np.where(known, pred_labels, 0), np.where(known, true_labels, 0))


def glomerulus_counts(pred_labels: np.ndarray, true_labels: np.ndarray) -> np.ndarray:
    """TP, FP, FN pixels of glomerulus (any class) against background."""
    p, t = pred_labels > 0, true_labels > 0
    return np.array([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()], np.float64)


def dice(tp: float, fp: float, fn: float, empty: float = float("nan")) -> float:
    """2TP / (2TP + FP + FN); ``empty`` when there is nothing on either side."""
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else empty


def match_components(pred_cc: np.ndarray, n_pred: int, true_cc: np.ndarray, n_true: int,
                     iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one matches (predicted id, true id) of two labelled component images, greedy by
    IoU >= ``iou_threshold`` (highest first): the one matching rule of the detection metrics."""
    pairs = []
    if n_pred and n_true:
        both = (pred_cc > 0) & (true_cc > 0)
        inter = np.bincount(pred_cc[both].astype(np.int64) * (n_true + 1) + true_cc[both],
                            minlength=(n_pred + 1) * (n_true + 1)).reshape(n_pred + 1, n_true + 1)
        area_p = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
        area_t = np.bincount(true_cc.ravel(), minlength=n_true + 1)
        for i, j in zip(*np.nonzero(inter)):
            iou = inter[i, j] / (area_p[i] + area_t[j] - inter[i, j])
            if iou >= iou_threshold:
                pairs.append((iou, int(i), int(j)))
    pairs.sort(reverse=True)
    used_p, used_t, matched = set(), set(), []
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            matched.append((i, j))
    return matched


def instance_matches(pred_labels: np.ndarray, true_labels: np.ndarray, iou_threshold: float = 0.5,
                     true_points=()) -> dict:
    """Glomerulus detection by IoU >= threshold between connected components (any class);
    one-to-one greedy by IoU. Also counts matched pairs whose class agrees. ``true_points``,
    (x, y, label) in label-image pixels, are true glomeruli without an outline: each one is
    matched by a predicted glomerulus that contains it and matched nothing else."""
    pred_cc, n_pred = ndimage.label(pred_labels > 0, structure=EIGHT_CONNECTED)
    true_cc, n_true = ndimage.label(true_labels > 0, structure=EIGHT_CONNECTED)
    matched = match_components(pred_cc, n_pred, true_cc, n_true, iou_threshold)
    used_p = {i for i, _ in matched}
    class_agree = 0
    for i, j in matched:
        pc = np.bincount(pred_labels[pred_cc == i], minlength=3)[1:].argmax()
        tc = np.bincount(true_labels[true_cc == j], minlength=3)[1:].argmax()
        class_agree += int(pc == tc)
    tp = len(matched)
    h, w = pred_labels.shape
    for x, y, label in true_points:
        n_true += 1
        i = int(pred_cc[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)])
        if i and i not in used_p:
            used_p.add(i)
            tp += 1
            class_agree += int(np.bincount(pred_labels[pred_cc == i], minlength=3)[1:].argmax() + 1 == label)
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_true)
    return {"n_predicted": n_pred, "n_true": n_true, "matched": tp, "class_agreement": class_agree,
            "detection_precision": precision, "detection_recall": recall,
            "detection_f1": _ratio(2 * precision * recall, precision + recall) if tp else 0.0}


def sclerosis_percent(labels: np.ndarray, points=()) -> float:
    """Percent of graded glomeruli (components, class by majority; and ``points``, (x, y, label)
    glomeruli without an outline) that are sclerosed; components mostly of unknown class (label
    3) are not graded. NaN when none is graded."""
    cc, n = ndimage.label(labels > 0, structure=EIGHT_CONNECTED)
    graded = sum(label in (NORMAL, SCLEROSED) for _, _, label in points)
    scl = sum(label == SCLEROSED for _, _, label in points)
    for i, sl in enumerate(ndimage.find_objects(cc), start=1):
        values = labels[sl][cc[sl] == i]
        majority = int(np.bincount(values, minlength=4)[1:].argmax()) + 1
        if majority in (NORMAL, SCLEROSED):
            graded += 1
            scl += int(majority == SCLEROSED)
    return 100.0 * scl / graded if graded else float("nan")
