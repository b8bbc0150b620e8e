"""Read images as RGB ``PIL.Image``s; a bad image is a clear ``DataError``, or skipped in bulk.

``load_image`` decodes the whole file (``Image.load``), so truncated or corrupt files fail
here, with the path in the message, rather than later inside an encoder's preprocessing.
``load_images`` reads many paths, skipping and reporting (count + paths, via ``logging``) the
ones that cannot be read, so one bad file never stops a long build.

Very large images: PIL raises ``DecompressionBombError`` beyond ``2 * Image.MAX_IMAGE_PIXELS``
pixels; that becomes a ``DataError`` (the image is skipped in bulk loading). Between one and two
times the limit PIL only warns; such an image is loaded and the warning goes to ``logging``
once per image instead of as a Python warning. No EXIF rotation is applied (as in the usual
CLIP preprocessing), so encoders see the stored pixel grid.

High-bit-depth greyscale (16-bit PNG/TIFF: PIL modes ``I;16*``, ``I``, ``F``) is scaled to 8 bits
by its nominal range (``I;16``: 0..65535; ``I`` and ``F``: the smallest of 0..1, 0..255 and
0..65535 that holds every value, else the image's own min..max), where PIL's ``convert("RGB")``
would clip every value above 255 to white.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from typing import NamedTuple, Sequence

from nofree.core import DataError

REF_SEP = ".tar#"  # a webdataset member reference: SHARD.tar#MEMBER (see nofree.data.webdataset)
REF_SEPS = (REF_SEP, ".tar.gz#", ".tgz#")  # the same in plain and gzip-compressed shards

log = logging.getLogger(__name__)


class LoadedImages(NamedTuple):
    """Result of ``load_images``.

    images:  the readable images, RGB, in input order.
    indices: for each entry of ``images``, its index in the input sequence.
    skipped: ``(path, reason)`` for each input that could not be read, in input order.
    """

    images: list
    indices: list[int]
    skipped: list[tuple[str, str]]


def load_image(path: str | os.PathLike):
    """Read and fully decode one image file; returns an RGB ``PIL.Image.Image``.

    ``path`` may also be a webdataset member reference ``SHARD.tar#MEMBER``.

    Raises ``DataError`` naming ``path`` when the file is missing, not an image, truncated or
    corrupt, or too large for PIL's decompression-bomb guard.
    """
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    source = name
    if isinstance(name, str) and any(sep in name for sep in REF_SEPS) and not os.path.exists(name):
        from nofree.data.webdataset import read_member

        source = io.BytesIO(read_member(name))  # a webdataset member: SHARD.tar#MEMBER
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")
                if image.mode.startswith("I") or image.mode == "F":
                    image = _to_8bit(image)
                rgb = image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist; fix the path in the pairs file (relative "
                        "paths are taken from the pairs file's folder)") from None
    except PermissionError:
        raise DataError(f"image {name} cannot be read: permission denied; fix its file "
                        "permissions") from None
    except IsADirectoryError:
        raise DataError(f"image path {name} is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise DataError(f"image {name} is not a readable image (unknown or corrupt format); "
                        "re-export it as JPEG or PNG, or remove it from the input") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"image {name} is too large to decode safely ({err}); resize it, or raise "
                        "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data, bad headers
        raise DataError(f"image {name} is corrupt or truncated ({err}); re-export it or remove it "
                        "from the input") from None
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            log.warning("image %s is very large (%s); decoding it anyway", name, warning.message)
        else:
            log.debug("image %s: %s", name, warning.message)
    return rgb


def _to_8bit(image):
    """A 16-bit / 32-bit integer or float greyscale image as 8-bit ``L`` (see the module docstring)."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((r for r in ranges if low >= 0 and high <= r), None)
    if top is None:  # outside every nominal range: stretch the image's own range
        values, top = values - low, max(high - low, 1e-12)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))  # L


def load_images(paths: Sequence[str | os.PathLike]) -> LoadedImages:
    """Read every path that can be read; unreadable ones are skipped, logged and listed.

    Never raises for a bad image: check ``result.skipped`` (and ``result.indices`` to line the
    images up with their captions).
    """
    images, indices, skipped = [], [], []
    for index, path in enumerate(paths):
        try:
            images.append(load_image(path))
            indices.append(index)
        except DataError as err:
            skipped.append((os.fspath(path), str(err)))
            log.debug("skipping %s", err)
    if skipped:
        shown = ", ".join(path for path, _ in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d of %d image(s) that could not be read: %s%s", len(skipped),
                    len(paths), shown, more)
    return LoadedImages(images, indices, skipped)


def report_skipped(paths: Sequence[str]) -> None:
    """The one report of unreadable images a command skipped: their count and the first few
    paths, as one ``logging`` warning (stderr in the CLI), given once at the end of a run."""
    if paths:
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        log.warning("skipped %d unreadable image(s): %s%s; strict=True (--strict) stops at the first "
                    "one instead", len(paths), ", ".join(paths[:5]), more)
