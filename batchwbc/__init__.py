"""batchwbc: nightly CPU classification of white-blood-cell crops into per-patient differentials."""

__version__ = "0.1.0"
