"""The classifier at a site (Flower-free): data and split (:mod:`.data`), feature tables (:mod:`.features`),
local optimisation (:mod:`.local`), the round replies (:mod:`.site`), SHAP and Grad-CAM (:mod:`.explain`), and
in-memory sites for tests and simulations (:mod:`.memory`). The message-facing steps are
:mod:`client.steps.classifier`; the driver is :func:`common.classifier.protocol.run_classifier`.
"""
