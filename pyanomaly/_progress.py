"""One progress and logging helper for every long loop (training epochs, scoring batches).

Progress bars are tqdm's on stderr, shown only when ``verbose``; messages go to the stdlib logger
``"pyanomaly"`` (the CLI sets it to INFO; a library user configures ``logging`` as usual).
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

__all__ = ["logger", "progress"]

logger = logging.getLogger("pyanomaly")


def progress(total: int, description: str, verbose: bool, unit: str = "step") -> tqdm:
    """A tqdm bar over ``total`` units (disabled unless ``verbose``); use as a context manager."""
    return tqdm(total=total, desc=description, unit=unit, disable=not verbose, leave=False, dynamic_ncols=True)
