"""Federated evaluation of classifiers from site aggregates: metrics, bootstrap CIs, fairness, explanations."""
