"""The application builder under its documented name, so that
``serve run router.serve_app:build_app config=configs/local.yaml`` keeps working. The app is
built in :mod:`router.ray_app.ingress`."""

from router.ray_app.ingress import build_app, wait_ready

__all__ = ["build_app", "wait_ready"]
