"""PDF from report HTML through WeasyPrint, fetching nothing from outside: data: URIs and
the package's own template files are served, every other URL is refused."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit
from urllib.request import url2pathname

from PIL import ImageFile

from pneumoscan.report.templates import templates

# Importing WeasyPrint sets Pillow's process-wide LOAD_TRUNCATED_IMAGES, after which the
# loader would read truncated scans without a word; keep Pillow's setting as it was.
_LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES
from weasyprint import HTML  # noqa: E402
from weasyprint.urls import URLFetcher, URLFetcherResponse  # noqa: E402

ImageFile.LOAD_TRUNCATED_IMAGES = _LOAD_TRUNCATED_IMAGES


# Archival PDF: PDF/A-3b (ISO 19005-3, visual appearance preserved: fonts embedded, sRGB
# output intent, XMP metadata), tagged so that screen readers follow its structure.
PDF_VARIANT = "pdf/a-3b"


def render_pdf(html: str) -> bytes:
    """An A4 PDF/A of a report's HTML, rendered once, fetching nothing from outside. Its
    metadata (title, subject, keywords, creator, date) comes from the HTML's <head>."""
    fetcher = LocalOnlyFetcher()
    return HTML(string=html, base_url=fetcher.templates_url, url_fetcher=fetcher).write_pdf(
        pdf_variant=PDF_VARIANT, pdf_tags=True)


class LocalOnlyFetcher(URLFetcher):
    """Serves data: URIs and files inside the package's templates folder; refuses any
    other URL (remote, or a local file elsewhere) with ValueError, which WeasyPrint logs
    as a warning before leaving the resource out."""

    def __init__(self) -> None:
        super().__init__(fail_on_errors=False)
        folder = templates()
        # Installed as plain files (the usual case) the templates can be served as file: URLs.
        self.templates_dir = Path(folder).resolve() if isinstance(folder, Path) else None
        self.templates_url = self.templates_dir.as_uri() + "/" if self.templates_dir else None

    def fetch(self, url: str, headers: dict | None = None) -> URLFetcherResponse:
        parts = urlsplit(url)
        if parts.scheme == "data":
            content_type, content = decode_data_uri(url)
            return URLFetcherResponse(url, content, {"Content-Type": content_type})
        if parts.scheme == "file" and parts.netloc in ("", "localhost") and self.templates_dir:
            path = Path(url2pathname(parts.path)).resolve()
            if path.is_relative_to(self.templates_dir) and path.is_file():
                content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                return URLFetcherResponse(url, path.read_bytes(), {"Content-Type": content_type})
        raise ValueError(f"refused to fetch {url[:200]!r}: a report may only load data: URIs "
                         "and files of the pneumoscan templates folder")


def decode_data_uri(url: str) -> tuple[str, bytes]:
    """data:[<media type>][;base64],<data> -> (media type, content). Done here rather than
    by urllib's opener, whose proxy handler would honour a `data_proxy` setting."""
    header, _, payload = url.removeprefix("data:").partition(",")
    media_type, *parameters = header.split(";")
    if parameters and parameters[-1] == "base64":
        return media_type or "text/plain", base64.b64decode(payload)
    return media_type or "text/plain", unquote_to_bytes(payload)
