"""The slms version, read from the installed package's metadata (pyproject.toml is its one
source)."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version


@functools.cache
def slms_version() -> str:
    """The installed version; "0+unknown" for a source tree on sys.path that was never
    installed (`pip install -e .` records it)."""
    try:
        return _distribution_version("slms")
    except PackageNotFoundError:
        return "0+unknown"
