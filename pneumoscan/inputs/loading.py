"""Load pixels and metadata of one input file (second stage of the pipeline).

`load` never raises for a bad file: it returns a `FileResult` with status `skipped` (not a
frontal chest radiograph, by its metadata) or `error` (cannot be read), and a one-line reason.
The loaders catch what the decoders raise around the decoders' calls alone
(`problems.decoding`). Any other exception is a bug of pneumoscan: the file's reason says so,
it is logged as a warning (with its traceback under `pneumoscan run -v`), so one file cannot
stop a cron run but the bug is not passed off as a bad file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pneumoscan.inputs.dicom import load_dicom
from pneumoscan.inputs.discover import identify_file
from pneumoscan.inputs.problems import ImageProblem, SkipImage
from pneumoscan.inputs.raster import load_raster
from pneumoscan.inputs.reading import InputChanged, open_input
from pneumoscan.records import FileResult, InputFile, LoadedImage
from pneumoscan.text import one_line, printable, reason

log = logging.getLogger(__name__)


def load(item: InputFile, min_size: tuple[int, int] | None = None) -> LoadedImage | FileResult:
    """Read one discovered file. `min_size` (width, height) lets decoders that can scale
    while decoding (JPEG, JPEG 2000) produce a smaller image that is still at least that
    large."""
    if item.kind is None:
        return FileResult(item.path, None, "error" if item.unreadable else "skipped",
                          reason(item.skip_reason or "not an image"))
    study = str(item.path.parent)
    try:
        with open_input(item.path, follow_link=item.link) as fh:
            if item.kind == "dicom":
                loaded = load_dicom(fh, item.path, min_size)
            else:
                loaded = load_raster(fh, item.path, min_size)
    except ImageProblem as exc:
        return FileResult(item.path, exc.study or study,
                          "skipped" if isinstance(exc, SkipImage) else "error",
                          reason(str(exc)), metadata=exc.metadata or {})
    except InputChanged as exc:
        return FileResult(item.path, study, "error", reason(f"changed since it was found: {exc}"))
    except FileNotFoundError:
        return FileResult(item.path, study, "error", "file disappeared before it could be read")
    except PermissionError:
        return FileResult(item.path, study, "error", "permission denied")
    except MemoryError:
        return FileResult(item.path, study, "error", "not enough memory to decode the image")
    except OSError as exc:  # reading the file itself failed (an I/O error)
        return FileResult(item.path, study, "error", f"cannot read: {one_line(exc)}")
    except Exception as exc:  # a bug of ours: said as one, the run goes on
        log.warning("a pneumoscan bug reading %s: %s", printable(str(item.path)),
                    one_line(exc), exc_info=log.isEnabledFor(logging.INFO))
        return FileResult(item.path, study, "error", f"unexpected error, a pneumoscan bug "
                          f"(run with -v for the traceback): {one_line(exc)}")
    return _unless_blank(loaded)


def load_path(path: Path, min_size: tuple[int, int] | None = None) -> LoadedImage | FileResult:
    """The file at `path` read as `pneumoscan run` reads it: its kind told by its content,
    then `load`."""
    return load(identify_file(path), min_size)


def _unless_blank(image: LoadedImage) -> LoadedImage | FileResult:
    """A blank image (every pixel the same) says nothing about the lungs, yet a model would
    still give it a score: it is never classified."""
    assert image.pixels is not None  # just decoded: dropped only once classified
    low, high = int(image.pixels.min()), int(image.pixels.max())
    if low != high:
        return image
    return FileResult(image.path, image.study, "error",
                      f"blank image: every pixel is {low} after decoding; not classified",
                      metadata=image.metadata)
