"""Encoded images from requests (JPEG, PNG, WebP), decoded with Pillow and bounded before they cost.

design: an image arrives as bytes (the binary formats, a V2 BYTES element, a raw `image/*` body) or
as a base64 string or `data:` URL (JSON). What an attacker controls is the header: a 50-kB PNG can
declare 30000 x 30000 pixels (2.7 GB decoded). So, in order, each step before anything grows:
the byte count (`max_image_bytes`); the format, from the magic bytes, allow-listed (`FORMATS`;
anything else - GIF, SVG, TIFF, BMP - is refused); the declared size from the header alone
(`Image.open` reads no pixels), against `max_image_pixels`; animation (several frames: refused, not
silently cut to the first); then a per-worker pixel budget (`PixelBudget`) that lets at most two
images of the largest allowed size decode at once, so a burst of large images queues instead of
multiplying memory; only then the decode. EXIF orientation is applied (a phone's portrait photo
is stored sideways), and every mode becomes RGB the way transformers' `convert_to_rgb` does it
(alpha composited onto white; CMYK, greyscale and palettes converted). Pillow's decoders release
the GIL, so decoding on the request threads runs in parallel with the batch thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from binserve.errors import InvalidInput, LimitExceeded
from models.image_steps import ImageSteps

#: what a request may send: Pillow's format name -> what the error messages call it
FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
_ACCEPTED = "JPEG, PNG or WebP"
_DATA_URL = "data:"
#: the largest EXIF block read: JPEG's own ceiling (one APP1 segment); PNG and WebP could carry more
MAX_EXIF_BYTES = 65535


@dataclass(frozen=True)
class ImageLimits:
    """What one encoded image may cost: its bytes, and the pixels its header declares."""

    #: bytes of one encoded image
    max_bytes: int = 16 << 20
    #: width x height one image may declare (24 MP: a 6000 x 4000 camera frame, 72 MB as RGB)
    max_pixels: int = 24_000_000


class PixelBudget:
    """Pixels being decoded at once in this process: at most `capacity`, the rest wait their turn.

    A request that could never fit is refused before it asks (the pixel limit is at most the
    capacity), so waiting always ends."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    def take(self, pixels: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.capacity or self.used == 0)
            self.used += pixels

    def give(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


_budgets: dict[int, PixelBudget] = {}
_budgets_lock = threading.Lock()


def budget_for(limits: ImageLimits) -> PixelBudget:
    """The process's pixel budget for this limit: two of the largest images at once."""
    with _budgets_lock:
        return _budgets.setdefault(limits.max_pixels, PixelBudget(2 * limits.max_pixels))


def image_bytes(value, where: str, limits: ImageLimits) -> bytes:
    """The encoded bytes of one request value: bytes as they are, a str as base64 or a data URL."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value
        if text.startswith(_DATA_URL):
            head, comma, text = text.partition(",")
            if not comma or not head.endswith(";base64"):
                raise InvalidInput(f"{where} is a data URL without ';base64,': send data:image/...;base64,<data>")
        if len(text) > 4 * (limits.max_bytes // 3 + 1):  # before decoding: base64 is 4 characters per 3 bytes
            raise LimitExceeded(f"{where} is over the {limits.max_bytes}-byte image limit (max_image_bytes)")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f"{where} is a string but not base64 (send the image's bytes, base64 or a data URL)"
            ) from None
    else:
        raise InvalidInput(f"{where} must be an encoded image: bytes, or a base64 string in JSON")
    if len(data) > limits.max_bytes:
        raise LimitExceeded(
            f"{where} is {len(data)} bytes; an image may be at most {limits.max_bytes} (max_image_bytes)"
        )
    if not data:
        raise InvalidInput(f"{where} is empty")
    return data


def open_image(data: bytes, where: str, limits: ImageLimits) -> Image.Image:
    """The image's header read and checked (format, declared size, frames); no pixels decoded yet."""
    try:
        with warnings.catch_warnings():  # our own limit decides, not Pillow's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise LimitExceeded(f"{where} declares more pixels than {limits.max_pixels} (max_image_pixels)") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"{where} is not a {_ACCEPTED} image") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes make Pillow raise many kinds; each is a bad image
        raise InvalidInput(f"{where} is not a valid image: {_short(exc)}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise LimitExceeded(
            f"{where} is {w} x {h} = {w * h} pixels; an image may have at most {limits.max_pixels} (max_image_pixels)"
        )
    if w == 0 or h == 0:
        raise InvalidInput(f"{where} is {w} x {h}: an image needs pixels")
    # a multi-picture JPEG (MPO: what many cameras write, a full image and its previews or stereo
    # pair) is one photo: its first picture is what every viewer shows, and all that is decoded
    if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
        raise InvalidInput(f"{where} is animated ({img.n_frames} frames); send one still image")
    _check_exif(img, where)
    return img


def _check_exif(img: Image.Image, where: str) -> None:
    size = len(img.info.get("exif") or b"")
    if size > MAX_EXIF_BYTES:
        raise InvalidInput(f"{where} carries an EXIF block of {size} bytes; at most {MAX_EXIF_BYTES} are read")


def decode_image(value, where: str, limits: ImageLimits, steps: ImageSteps | None = None):
    """One request value as a decoded RGB image, upright (EXIF), within the limits; with `steps`,
    the model's input array made from it. The process's pixel budget holds the image's pixels and,
    with `steps`, what the resize makes of it (a small image can be resized to a large one), from
    before decoding until the array is made."""
    img = open_image(image_bytes(value, where, limits), where, limits)
    pixels = img.size[0] * img.size[1]
    if steps is not None:  # the resize's size is the same whichever way EXIF turns the image
        rh, rw = steps.resized((img.size[1], img.size[0]))
        if rh * rw > limits.max_pixels:
            raise LimitExceeded(
                f"{where} ({img.size[0]} x {img.size[1]}) would be resized to {rw} x {rh} pixels, over the "
                f"{limits.max_pixels}-pixel limit (max_image_pixels): its aspect ratio is too extreme"
            )
        pixels += rh * rw
    budget = budget_for(limits)
    budget.take(pixels)
    try:
        img.load()
        _check_exif(img, where)  # a PNG's eXIf chunk after the pixels is read only now
        img = to_rgb(ImageOps.exif_transpose(img))
        return img if steps is None else steps.apply(img, where, limits.max_pixels)
    except (InvalidInput, LimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data surfaces here, in many kinds
        raise InvalidInput(f"{where} could not be decoded: {_short(exc)}") from None
    finally:
        budget.give(pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def prepared(value, name: str, steps: ImageSteps, limits: ImageLimits, max_decoded_bytes: int, check_samples):
    """A request's value for image input `name` - one image, or a list of them - as model inputs:
    (samples, batched, seconds spent decoding and preprocessing). The count is checked before any
    decoding (`check_samples`, and what the samples would hold against `max_decoded_bytes`)."""
    batched = isinstance(value, (list, tuple))
    values = list(value) if batched else [value]
    if not values:
        raise InvalidInput(f"'{name}' is an empty list; send at least one image")
    check_samples(len(values), f"'{name}'")
    shape = steps.shape()
    if shape is not None:
        total = len(values) * math.prod(shape) * np.dtype(steps.dtype).itemsize
        if total > max_decoded_bytes:
            raise LimitExceeded(
                f"'{name}' holds {len(values)} images, {total} bytes once preprocessed; one request may hold "
                f"{max_decoded_bytes} (max_decoded_bytes): split it"
            )
    started = time.perf_counter()
    samples = []
    for i, v in enumerate(values):
        where = f"'{name}'[{i}]" if batched else f"'{name}'"
        samples.append(decode_image(v, where, limits, steps))
    return samples, batched, time.perf_counter() - started
