"""The shipped CT's fixtures (ct_fixtures.py) for this package's modules."""

from ct_fixtures import biplane, ct, registrar  # noqa: F401
