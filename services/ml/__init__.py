"""The ml service: see :mod:`services.ml.app`."""
