"""Importing FFCV without its import-time numba compilation.

`ffcv.fields.rgb_image` builds its two-entry table of image modes (`IMAGE_MODES`, "jpg" -> 0, "raw" -> 1)
as a numba typed dict when it is imported, and the first typed dict of a process compiles numba's whole
dict implementation: about 8 s of CPU on a 2-core machine, paid by every process that imports ffcv
(every rank, every `vilscale prepare` worker). FFCV and vilscale only ever read that table from Python
(when generating code), so `import_ffcv` has the first import build it as a plain dict.
"""

from __future__ import annotations

import sys


def import_ffcv() -> None:
    """Import the ffcv package (once per process) with `IMAGE_MODES` as a plain dict."""
    if "ffcv" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict  # what `from numba.typed import Dict` in ffcv's modules picks up during the import
    try:
        import ffcv  # noqa: F401 - imports ffcv.fields.rgb_image (and the rest of the package)
    finally:
        numba.typed.Dict = typed_dict
