"""What the site's local training of segmentation and classifier models shares (Flower-free).

The torch device and CPU threads (:mod:`.device`), patient-level DP-SGD with its accountant (:mod:`.dp`) and
PNG overlays that stay at the site (:mod:`.overlays`). The segmentation modules are in
:mod:`client.segmentation`, the classifier's in their own folder.
"""
