"""Federated tumour segmentation: the plan, the aggregation maths and the metrics (Flower-free)."""
