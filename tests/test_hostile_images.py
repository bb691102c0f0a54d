"""Query images a client may send (the server's /search, `cmce search --images`): damaged multi-page files, rarely
used formats, metadata that turns the image, 32-bit pixels. Each is decoded as a viewer would or refused by a
DataError naming it (a 4xx, or exit 2), never another exception (a 500, a traceback)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from cmce.data import codec
from cmce.data.codec import decode_image, decode_image_as_found
from cmce.data.schema import DataError


def _tiff(pages: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    first, *rest = (Image.fromarray(p) for p in pages)
    first.save(buf, format="TIFF", save_all=True, append_images=rest)
    return buf.getvalue()


def _second_ifd(data: bytes) -> tuple[int, int]:
    """(where the first page's next-IFD pointer is, the offset it holds) of a little-endian TIFF."""
    assert data[:2] == b"II"
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    at = first + 2 + 12 * entries
    return at, struct.unpack_from("<I", data, at)[0]


PAGE = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3


@pytest.mark.parametrize("damage", ["past the end", "emptied"])
def test_a_tiff_whose_second_page_is_damaged_gives_its_first_page(damage):
    """Counting the pages walked into the second one: TypeError ("Missing dimensions"), a 500."""
    data = bytearray(_tiff([PAGE, PAGE[::-1]]))
    at, second = _second_ifd(bytes(data))
    if damage == "past the end":
        struct.pack_into("<I", data, at, len(data) + 4096)
    else:
        struct.pack_into("<H", data, second, 0)  # a directory of no entries
    arr, (width, height, mode, animated) = decode_image_as_found(bytes(data), 1, 8, "images[0]")
    assert np.array_equal(arr[0], PAGE) and (width, height, mode, animated) == (8, 8, "L", True)


def test_the_pages_of_a_tiff_are_not_counted(monkeypatch):
    """n_frames walks every page, quadratic in their number: 140,000 one-pixel pages (5.9 MB) took 138 s of CPU in
    one request. Whether there is a second page comes from the first's header."""
    data = _tiff([np.full((1, 1), v, np.uint8) for v in range(50)])

    def counted(self):
        raise AssertionError("the pages were counted")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(counted))
    arr, (_, _, _, animated) = decode_image_as_found(data, 1, 8, "images[0]")
    assert animated and (arr == 0).all()
    assert decode_image_as_found(_tiff([PAGE]), 1, 8, "x")[1][3] is False


@pytest.mark.parametrize("size", [8, 9])
def test_an_apng_is_an_animation_at_any_size(size):
    """At the model's own size a grey PNG takes the fast path, which said "one frame" of a 3-frame APNG: search
    warned of the animation for a 9 px copy and not for the 8 px one."""
    frames = [Image.fromarray(np.full((size, size), v, np.uint8)) for v in (10, 20, 30)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    arr, (_, _, _, animated) = decode_image_as_found(buf.getvalue(), 1, 8, "q")
    assert animated and (arr == 10).all()
    assert codec.decode_png_fast(buf.getvalue(), 1, 8) is not None or size != 8  # the fast path, at the size
    assert decode_image_as_found(codec.encode_png(np.full((size, size), 10, np.uint8)), 1, 8, "q")[1][3] is False


@pytest.mark.parametrize("error", [TypeError("Missing dimensions"), IndexError("list index out of range"),
                                   NotImplementedError(), AttributeError("'NoneType' object has no attribute 'x'"),
                                   struct.error("unpack requires a buffer of 4 bytes")])
def test_any_decoder_failure_is_one_line_naming_the_image(monkeypatch, error):
    """Pillow's plugins raise more than OSError and ValueError on damaged bytes."""
    def broken(self):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    buf = io.BytesIO()
    Image.new("L", (9, 9)).save(buf, format="PNG")  # not the model's size: PIL's path
    with pytest.raises(DataError, match=r"^images\[2\]: corrupt or unreadable image: \S"):
        decode_image(buf.getvalue(), 1, 8, "images[2]")


@pytest.mark.parametrize("fmt", ["DDS", "BLP", "SPIDER", "ICO", "SGI", "PCX"])
def test_formats_beside_the_decoded_ones_are_refused_by_name(fmt):
    """Every Pillow plugin was tried: DDS raised NotImplementedError, BLP its own error, SPIDER AttributeError."""
    buf = io.BytesIO()
    image = Image.new({"SPIDER": "F", "BLP": "P"}.get(fmt, "RGB"), (8, 8))
    image.save(buf, format=fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).format == fmt  # Pillow reads what it wrote
    with pytest.raises(DataError, match=r"^q: corrupt or unreadable image: damaged, or in a format this tool does "
                                        r"not decode \(it decodes PNG, JPEG, GIF, BMP, TIFF, WebP, PPM/PGM\)"):
        decode_image(buf.getvalue(), 3, 8, "q")


@pytest.mark.parametrize("fmt", [f for f in codec.DECODED if f != "MPO"])  # Pillow writes no one-frame MPO
def test_every_decoded_format_is_decoded(fmt):
    buf = io.BytesIO()
    Image.fromarray(PAGE).convert("RGB" if fmt in ("WEBP",) else "L").save(
        buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}), **({"quality": 100} if fmt == "JPEG" else {}))
    got = decode_image(buf.getvalue(), 1, 8, "q")[0].astype(int)
    assert np.abs(got - PAGE).max() <= (8 if fmt == "JPEG" else 0), fmt


def _xmp(orientation: int) -> str:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
            f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("size", [8, 9])
def test_a_png_turned_by_xmp_is_decoded_upright_at_any_size(size):
    """At exactly the model's size (8) the OpenCV shortcut took it as stored (it looked for an eXIf chunk only);
    at another size PIL's path turned it."""
    upright = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    plain, tagged = io.BytesIO(), io.BytesIO()
    Image.fromarray(upright).save(plain, format="PNG")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp(3))  # rotate 180° to view
    Image.fromarray(np.rot90(upright, 2).copy()).save(tagged, format="PNG", pnginfo=info)
    want = decode_image(plain.getvalue(), 1, 8, "q")
    assert np.array_equal(decode_image(tagged.getvalue(), 1, 8, "q"), want)
    assert not np.array_equal(np.rot90(want, 2, axes=(1, 2)), want)


def test_a_png_with_other_text_chunks_keeps_the_fast_path():
    """Only the chunks an orientation can be in send a PNG to PIL's slower path (ImageMagick and matplotlib write
    text chunks into ordinary PNGs)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "matplotlib")
    info.add_itxt("Comment", "a note", zip=True)
    buf = io.BytesIO()
    Image.fromarray(PAGE).save(buf, format="PNG", pnginfo=info)
    assert np.array_equal(codec.decode_png_fast(buf.getvalue(), 1, 8)[0], PAGE)
    info.add_text("Raw profile type exif", "\nexif\n       0\n")  # ImageMagick's EXIF: PIL's path
    buf = io.BytesIO()
    Image.fromarray(PAGE).save(buf, format="PNG", pnginfo=info)
    assert codec.decode_png_fast(buf.getvalue(), 1, 8) is None


def test_a_gif_whose_second_frame_cannot_be_read_says_it_has_more(monkeypatch):
    """Whether a GIF has a second frame is found by seeking to it: a damaged one may raise anything there. Its first
    frame was decoded, so it is kept, and the image is said to have more frames."""
    from PIL import GifImagePlugin

    def damaged(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "is_animated", property(damaged))
    buf = io.BytesIO()
    Image.fromarray(PAGE).save(buf, format="GIF")
    arr, (_, _, _, animated) = decode_image_as_found(buf.getvalue(), 1, 8, "q")
    assert animated and np.array_equal(arr[0], PAGE)


def test_32_bit_pixels_without_a_scale_are_refused_as_the_import_refuses_them():
    """A 0..1 float TIFF was read as an all-black image (the hits of black), a 32-bit integer one with negative
    values clipped; importing either is refused, so the query path guessed what the gallery never saw."""
    for array, message in ((PAGE.astype(np.float32) / 255, r"unsupported image mode 'F' \(32-bit float"),
                           (PAGE.astype(np.int32) - 100, r"32-bit integer image with values outside 0\.\.65535")):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="TIFF")
        with pytest.raises(DataError, match=rf"^images\[0\]: {message}"):
            decode_image(buf.getvalue(), 1, 8, "images[0]")
    buf = io.BytesIO()
    Image.fromarray(PAGE.astype(np.int32) * 200).save(buf, format="TIFF")  # within 16 bits: scaled as 16-bit
    assert np.array_equal(decode_image(buf.getvalue(), 1, 8, "q")[0],
                          (PAGE.astype(np.float64) * 200 * 255 / 65535).astype(np.uint8))
