"""Evaluation: predictions of a trained model on a split (:mod:`.predict`), the metrics
(:mod:`.metrics`: AUROC, AUPRC, sensitivity at a chosen specificity, calibration, McNemar) and a saved
checkpoint evaluated on a manifest split (:mod:`.checkpoint`, ``wsi-cmaf evaluate``)."""
