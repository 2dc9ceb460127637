"""Operations around a run: locks, signals, parent watch, logging, provenance, output paths
and exit codes; nothing here knows about cells.
"""
