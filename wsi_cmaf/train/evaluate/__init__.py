"""Evaluation: predictions of a trained model on a split (:mod:`.predict`) and the metrics
(:mod:`.metrics`: AUROC, AUPRC, sensitivity at a chosen specificity, calibration, McNemar)."""
