"""Local training at a site (Flower-free).

Segmentation: data and patch sampling (:mod:`.data`), networks and weight exchange (:mod:`.networks`), the local
step (:mod:`.local`), DP-SGD (:mod:`.dp`), sliding-window inference and evaluation, and the entry points the
ClientApp calls (:mod:`.task`: ``site_cohort``, ``train_round``, ``evaluate_round``).
"""
