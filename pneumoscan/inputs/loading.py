"""Load pixels and metadata of one input file (second stage of the pipeline).

`load` never raises for a bad file: it returns a `FileResult` with status `skipped` (not a
frontal chest radiograph, by its metadata) or `error` (cannot be read), and a one-line reason.
"""

from __future__ import annotations

from pneumoscan.inputs.dicom import load_dicom
from pneumoscan.inputs.problems import ImageProblem, SkipImage
from pneumoscan.inputs.raster import load_raster
from pneumoscan.records import FileResult, InputFile, LoadedImage
from pneumoscan.text import one_line


def load(item: InputFile, min_size: tuple[int, int] | None = None) -> LoadedImage | FileResult:
    """Read one discovered file. `min_size` (width, height) lets decoders that can scale
    while decoding (JPEG, JPEG 2000) produce a smaller image that is still at least that
    large."""
    study = str(item.path.parent)
    if item.kind is None:
        return FileResult(item.path, study, "error" if item.unreadable else "skipped",
                          item.skip_reason or "not an image")
    try:
        if item.kind == "dicom":
            return load_dicom(item.path, min_size)
        return load_raster(item.path, min_size)
    except ImageProblem as exc:
        status = "skipped" if isinstance(exc, SkipImage) else "error"
        return FileResult(item.path, exc.study or study, status, str(exc),
                          metadata=exc.metadata or {})
    except FileNotFoundError:
        return FileResult(item.path, study, "error", "file disappeared before it could be read")
    except PermissionError:
        return FileResult(item.path, study, "error", "permission denied")
    except MemoryError:
        return FileResult(item.path, study, "error", "not enough memory to decode the image")
    except Exception as exc:  # any decoder failure is a file-level error, never a crash
        return FileResult(item.path, study, "error", f"cannot read: {one_line(exc)}")
