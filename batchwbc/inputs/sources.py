"""The registry of crop sources: where a run's crop records (patient, path, relative name) come from.

A source turns a root (a folder today; an export from an analyser's database tomorrow) into a
`slide_folders.Discovery`: the `Crop` records to classify, in report order, and what was
ignored. The slide-folder layout (one folder per patient) is the first and the default. A new
input format is one function returning a Discovery and one row in SOURCES; the engine and the
outputs do not change.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from batchwbc.inputs.slide_folders import Discovery

#: The layout a run reads unless told otherwise.
DEFAULT_SOURCE = "slide-folders"


def _slide_folders(root: str | os.PathLike) -> "Discovery":
    """SLIDES/<patient>/... crops at any depth; images directly in SLIDES form their own group."""
    from batchwbc.inputs import slide_folders  # looked up per call: tests replace discover

    return slide_folders.discover(root)


#: Source name -> function(root) -> Discovery (raises slide_folders.DiscoveryError, one sentence).
SOURCES: dict[str, Callable[[str | os.PathLike], "Discovery"]] = {
    DEFAULT_SOURCE: _slide_folders,
}


def find_crops(root: str | os.PathLike, source: str = DEFAULT_SOURCE) -> "Discovery":
    """The crop records below `root` as the named source reads them."""
    read = SOURCES.get(source)
    if read is None:
        raise ValueError(f"unknown crop source {source!r}; known: {', '.join(sorted(SOURCES))}.")
    return read(root)
