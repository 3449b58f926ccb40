"""Deployment on Flower's deployment engine: certificates and node keys, a local multi-process federation,
templates for hospital IT (compose, systemd, site.yaml) and the operations guide (``deploy/OPERATIONS.md``)."""
