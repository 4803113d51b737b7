"""The tracking tests' fixtures (tracking_fixtures.py) for this package's modules."""

from tracking_fixtures import biplane, ct, registrar  # noqa: F401
