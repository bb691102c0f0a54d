"""Image bytes: decoding for the models (OpenCV's fast path for the datasets' small 8-bit PNGs, PIL for
everything else), re-encoding imported images as PNG, and uint8 → float for a network. Images are decoded
upright: an EXIF Orientation tag (what phone cameras write instead of rotating the pixels) is applied, as any
viewer does, so a query photo and the gallery's copy of it give the same pixels."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cmce.data.schema import DataError

log = logging.getLogger(__name__)

_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L"}


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxW (grey) or HxWxC array → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


MAX_PIXELS = 40_000_000  # the default of data.max_image_pixels: about 6,300 × 6,300
_max_pixels = MAX_PIXELS
_limit_name = "data.max_image_pixels"  # the setting a refusal names: the config key, or a server's flag
# Pillow's own bomb check follows the limit (it refuses over twice Image.MAX_IMAGE_PIXELS, as it opens an image and
# where a plugin sizes something while loading): what it refuses is over the limit too, and is refused naming the
# limit (its message named its own 178,956,970 pixels). Its warning, between once and twice, precedes a refusal.
Image.MAX_IMAGE_PIXELS = _max_pixels
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def pixel_limit(max_pixels: int, name: str = "data.max_image_pixels") -> Iterator[None]:
    """Images opened inside the block may have at most `max_pixels` pixels (the setting `name`)."""
    global _max_pixels, _limit_name
    previous, _max_pixels, _limit_name = (_max_pixels, _limit_name), max_pixels, name
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        _max_pixels, _limit_name = previous
        Image.MAX_IMAGE_PIXELS = _max_pixels


_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")  # in Pillow's DecompressionBombError: "Image size (N pixels) …"


def _too_many_pixels(origin: Path | str, pixels: str) -> DataError:
    return DataError(f"{origin}: refused, too many pixels: {pixels}, over {_limit_name} ({_max_pixels:,})")


def _bomb_refused(origin: Path | str, err: Image.DecompressionBombError) -> DataError:
    """Pillow's refusal as this module's: the image's pixel count against the limit that applies."""
    found = _PILLOW_PIXELS.search(str(err))
    return _too_many_pixels(origin, f"{int(found[1]):,}" if found else "more than twice the limit")


def _check_pixels(img: Image.Image, origin: Path | str) -> None:
    check_pixel_count(*img.size, origin)


MAX_ARRAY_IMAGES = 2_000_000  # images one array file (.npz, IDX) may state: Fashion-MNIST's hold 60,000


def check_image_count(count: int, origin: Path | str) -> None:
    """Refuse an array file stating more images than MAX_ARRAY_IMAGES, before they are read: each is encoded to PNG
    in memory, and a 389 kB archive of 200 million 1 × 1 images held prepare-data for an hour at 10 GB and growing."""
    if count > MAX_ARRAY_IMAGES:
        raise DataError(f"{origin}: states {count:,} images, over the {MAX_ARRAY_IMAGES:,} an array file may hold here "
                        "(give a larger set as an ImageFolder)")


def check_pixel_count(width: int, height: int, origin: Path | str) -> None:
    """Refuse an image of width × height over the pixel limit, before its pixels are read (arrays in IDX or .npz files
    state their shape first)."""
    if width * height > _max_pixels:
        raise _too_many_pixels(origin, f"{width} × {height} = {width * height:,}")


def read_image_file(path: Path) -> bytes:
    """An image file's bytes, refused unread when it is larger than any image within the pixel limit can be
    (8 bytes a pixel, 16-bit RGBA stored raw, and 16 MiB of metadata): a 5 GB file ran the import out of memory."""
    size, cap = path.stat().st_size, _max_pixels * 8 + (16 << 20)
    if size > cap:
        raise DataError(f"{path}: a file of {size:,} bytes, more than an image of {_limit_name} ({_max_pixels:,}) "
                        "pixels takes; refused unread")
    return path.read_bytes()


# formats a user may well send that Pillow does not read: (signature offset, signature, name)
OTHER_FORMATS = ((4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"),
                 (4, b"ftypavif", "AVIF"), (0, b"%PDF", "PDF"), (0, b"<svg", "SVG"), (0, b"<?xml", "SVG or other XML"),
                 (0, b"\xff\x0a", "JPEG XL"))


# Pillow plugins that run another program on the data (EPS: Ghostscript) or open what they hold with every plugin
# (IPTC): never opened, whoever sends the image
NOT_OPENED = frozenset({"EPS", "IPTC"})
# the formats decoded (MPO: a camera's multi-picture JPEG; PPM: also PGM, PBM): the rarely used plugins beside them
# (DDS, BLP, SPIDER, …) raised NotImplementedError, AttributeError or their own errors on damaged bytes
DECODED = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM")
DECODED_SAID = "PNG, JPEG, GIF, BMP, TIFF, WebP, PPM/PGM"


def _in_process_formats() -> list[str]:
    """The DECODED formats Pillow has (none of NOT_OPENED)."""
    Image.init()
    return [name for name in DECODED if name in Image.OPEN]


def _damaged(origin: Path | str, err: Exception) -> DataError:
    """A decoder's failure on damaged bytes as one line: Pillow's plugins raise more than OSError and ValueError
    on them (TypeError, IndexError, struct.error, …), which gave a 500 and a traceback."""
    said = str(err) or type(err).__name__
    return DataError(f"{origin}: corrupt or unreadable image: {said}")


def _refused_format(data: bytes) -> str | None:
    """Which of NOT_OPENED the data is, by Pillow's own test of its first bytes (what Image.open reads)."""
    for name in sorted(NOT_OPENED):
        accept = Image.OPEN.get(name, (None, None))[1]
        if accept is not None and accept(data[:16]):
            return name
    return None


def _known_format(data: bytes) -> str | None:
    head = data[:64].lstrip()
    return next((name for at, sig, name in OTHER_FORMATS if (data if at else head)[at:at + len(sig)] == sig), None)


def open_image(data: bytes, origin: Path | str) -> Image.Image:
    """Decoded image; one with more pixels than the limit is refused from its header, before it is decoded, by a
    message naming the limit whichever check caught it."""
    img = image_header(data, origin)
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise _bomb_refused(origin, err) from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _damaged(origin, err) from None
    return upright(img, origin)


def image_header(data: bytes, origin: Path | str) -> Image.Image:
    """The image opened from its header alone (size and mode known, no pixel decoded), refused as open_image
    refuses it: empty, in a format not decoded here, damaged, or over the pixel limit."""
    if not data:
        raise DataError(f"{origin}: empty (zero-byte) image")
    try:
        img = Image.open(io.BytesIO(data), formats=_in_process_formats())
    except Image.DecompressionBombError as err:
        raise _bomb_refused(origin, err) from None
    except UnidentifiedImageError:  # Pillow names its BytesIO ("cannot identify image file <_io.BytesIO …>")
        if refused := _refused_format(data):
            raise DataError(f"{origin}: {refused} images are not decoded (their decoder runs another program on "
                            "the data); convert it to PNG or JPEG") from None
        kind = _known_format(data)
        what = f"{kind}, a format" if kind else "damaged, or in a format"
        raise DataError(f"{origin}: corrupt or unreadable image: {what} this tool does not decode (it decodes "
                        f"{DECODED_SAID})") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure on hostile bytes (see _damaged)
        raise _damaged(origin, err) from None
    _check_pixels(img, origin)
    return img


def upright(img: Image.Image, origin: Path | str) -> Image.Image:
    """The loaded image turned as its EXIF Orientation tag says (the pixel count stays the same). An EXIF block
    that cannot be parsed leaves the pixels as stored: the image itself is readable."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as err:
        log.warning("%s: EXIF orientation unreadable (%s); the image is used as stored", origin, err)
    return img


# modes PNG cannot store but that have a defined 8-bit colour conversion
_TO_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV"}


def _sixteen_bit(img: Image.Image, origin: Path | str) -> np.ndarray:
    """A 32-bit integer image's pixels, refused unless within 16 bits: beyond, no intensity scale is defined."""
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(f"{origin}: 32-bit integer image with values outside 0..65535; convert it to 8 or 16 bit")
    return arr


def to_png(data: bytes, origin: Path | str) -> bytes:
    """Re-encode an imported image as PNG, keeping 16-bit grey; modes without a defined intensity
    scale (32-bit float, 32-bit integers beyond 16 bits) are refused rather than guessed."""
    img = open_image(data, origin)
    if img.mode in _TO_RGB_MODES:
        img = img.convert("RGB")
    elif img.mode == "I":  # 32-bit integer, e.g. a 16-bit TIFF or PNG some readers widen
        img = Image.fromarray(_sixteen_bit(img, origin).astype(np.uint16))
    elif img.mode not in _PNG_MODES:
        raise DataError(f"{origin}: unsupported image mode {img.mode!r}; convert it to 8- or 16-bit grey or RGB(A)")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# what, in a PNG, Pillow reads an orientation from: the eXIf chunk, and the keywords (never compressed) of an XMP
# packet and of ImageMagick's EXIF text chunk
ORIENTATION_MARKS = (b"eXIf", b"XML:com.adobe.xmp", b"Raw profile type exif")
PNG_MIN_BYTES = 8 + 25 + 12  # signature, IHDR chunk, IEND chunk


def decode_png_fast(data: bytes, channels: int, size: int) -> np.ndarray | None:
    """uint8 CxHxW of an 8-bit grey (channels 1) or RGB (channels 3) PNG already size×size, decoded by
    OpenCV (libpng), ~4x less per-image overhead than PIL on small images; None for anything else
    (other colour types or bit depths, another size, JPEG, undecodable), which PIL then handles with
    every mode conversion and error message. PNG is lossless, so both give the same pixels."""
    if len(data) < PNG_MIN_BYTES or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[-8:-4] != b"IEND":
        return None  # not a PNG, or truncated: PIL's path names the problem (libpng would print to stderr)
    # an EXIF chunk, XMP or a "Raw profile type exif" text chunk may hold an orientation, which OpenCV's unchanged
    # read ignores: PIL's path (the datasets' own PNGs hold none of them; other text chunks keep the fast path)
    if any(mark in data for mark in ORIENTATION_MARKS):
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    # IHDR colour type 0 = grey, 2 = RGB; checking the header first also keeps oversized images on PIL's
    # decompression-bomb check
    if (width, height, depth, colour) != (size, size, 8, 0 if channels == 1 else 2):
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape != ((size, size) if channels == 1 else (size, size, 3)):
        return None  # e.g. a tRNS chunk makes OpenCV add an alpha channel: PIL's path decides
    return arr[None] if channels == 1 else arr[:, :, ::-1].transpose(2, 0, 1)  # BGR → RGB


def decode_image(data: bytes, channels: int, size: int, origin: str) -> np.ndarray:
    """PNG/JPEG bytes → uint8 CxHxW; converts any mode (grey, RGBA on white, 16-bit) and resizes."""
    return decode_image_as_found(data, channels, size, origin)[0]


MODE_NAMES = {"L": "grey", "LA": "grey with alpha", "1": "1-bit", "P": "palette", "PA": "palette with alpha",
              "I": "32-bit grey", "I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey"}


def query_image_notes(found: tuple[int, int, str, bool], channels: int, size: int) -> list[str]:
    """What a search says of a query image as decode_image_as_found found it (`cmce search` logs it, serve answers
    it): that only the first frame of an animation or a multi-page image is searched, and that one of another size
    or mode than the query model reads is converted (a colour photo searched with a grey model is a likely
    mistake). Empty when neither."""
    width, height, mode, more_frames = found
    want = "L" if channels == 1 else "RGB"
    notes = ["an animation or a multi-page image; its first frame is searched"] if more_frames else []
    if (width, height, mode) != (size, size, want):
        notes.append(f"{width}×{height} {MODE_NAMES.get(mode, mode)}, read as the query model's {size}×{size} "
                     f"{MODE_NAMES.get(want, want)}")
    return notes


def decode_image_as_found(data: bytes, channels: int, size: int, origin: str
                          ) -> tuple[np.ndarray, tuple[int, int, str, bool]]:
    """decode_image's array, and the image as found before conversion: (width, height, PIL mode, whether it has
    more frames), upright; of an animation (a GIF, an APNG) or a multi-page TIFF the first frame is read."""
    if not isinstance(data, bytes | bytearray | memoryview):  # a null cell of a dataset's image column
        raise DataError(f"{origin}: no image (the image cell is {'null' if data is None else type(data).__name__})")
    fast = decode_png_fast(data, channels, size)
    if fast is not None:  # an APNG's animation control chunk comes before its first image data
        return fast, (size, size, "L" if channels == 1 else "RGB", b"acTL" in data[:data.find(b"IDAT")])
    img = open_image(data, origin)
    arr = _converted(img, channels, size, origin)
    return arr, (*img.size, img.mode, _more_frames(img))


def _more_frames(img: Image.Image) -> bool:
    """Whether the image has a second frame or page, from the first's header (`is_animated`): n_frames walked every
    page of a TIFF, quadratic in their number (140,000 one-pixel pages in 5.9 MB took 138 s)."""
    try:
        return bool(getattr(img, "is_animated", False))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a damaged second frame: there is one, and only the first is read
        return True


# 32-bit modes without a defined 8-bit scale (as to_png refuses them): guessed, they changed what the model saw
_NO_SCALE = {"F": "32-bit float"}


# how an image becomes a model's pixels (open_image, then _converted), for an edge client that must do the same: a
# phone's own bilinear resize (no antialiasing) or a photo read without its EXIF turn found other neighbours
PREPROCESS = ("EXIF orientation applied; 16-bit grey scaled by 255/65535; transparency composited over white; "
              "converted to {mode} by Pillow; resized to {size}x{size} (aspect not kept) by Pillow's BILINEAR filter, "
              "which antialiases when shrinking; uint8, channels first")


def _converted(img: Image.Image, channels: int, size: int, origin: Path | str = "image") -> np.ndarray:
    """A decoded image as a model reads it: grey or RGB uint8 CxHxW, size×size."""
    if img.mode in _NO_SCALE:
        raise DataError(f"{origin}: unsupported image mode {img.mode!r} ({_NO_SCALE[img.mode]}: no defined "
                        "intensity scale); convert it to 8- or 16-bit grey or RGB")
    if img.mode == "I":
        _sixteen_bit(img, origin)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: a fixed scale, so a dark image is not brightened relative to a bright one
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:  # convert() copies even when the mode already matches
        try:
            img = img.convert(mode)
        except ValueError as err:  # a mode Pillow has no conversion for
            raise DataError(f"{origin}: image mode {img.mode!r} cannot be converted to {mode}: {err}") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a copy: np.asarray may share PIL's read-only buffer, which torch warns of
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW → float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)
