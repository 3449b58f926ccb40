"""Local segmentation training at a site (Flower-free).

Data and patch sampling (:mod:`.data`), the local step (:mod:`.local`), sliding-window inference
(:mod:`.inference`) and evaluation (:mod:`.evaluation`), and the entry points the site steps call
(:mod:`.task`: ``site_cohort``, ``train_round``, ``evaluate_round``). The network is
:mod:`common.segmentation.networks` (the server builds it too); DP-SGD is :mod:`client.training.dp`.
"""
