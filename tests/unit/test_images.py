"""Decoding encoded images under their limits (models/images.py) and preprocessing them as
transformers' own image processors do (models/image_steps.py)."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import transformers
from PIL import Image, ImageFile, ImageOps

from binserve.errors import InvalidInput, LimitExceeded
from models import images
from models.image_steps import ImageSteps
from models.images import ImageLimits, PixelBudget, decode_image, prepared
from tests.images import encode, hostile, photo, strip

LIMITS = ImageLimits()


def decoded(value, limits=LIMITS) -> np.ndarray:
    return np.asarray(decode_image(value, "'images'", limits))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels_from_bytes_base64_or_a_data_url(fmt):
    img = photo(48, 64)
    data = encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    b64 = base64.b64encode(data).decode()
    for value in (data, memoryview(data), bytearray(data), b64, f"data:image/{fmt.lower()};base64,{b64}"):
        np.testing.assert_array_equal(decoded(value), np.asarray(img))


def test_a_jpeg_decodes_as_pillow_decodes_it():
    data = encode(photo(), "JPEG", quality=90)
    np.testing.assert_array_equal(decoded(data), np.asarray(Image.open(__import__("io").BytesIO(data))))


def test_exif_orientation_is_honoured():
    img = photo(40, 80)  # landscape pixels, stored with "rotate 90 CW to view" (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    got = decoded(encode(img, "JPEG", exif=exif, quality=95))
    assert got.shape == (80, 40, 3)  # upright: portrait
    want = np.asarray(ImageOps.exif_transpose(Image.open(__import__("io").BytesIO(encode(img, "JPEG", exif=exif,
                                                                                         quality=95)))))  # fmt: skip
    np.testing.assert_array_equal(got, want)


def test_every_mode_becomes_rgb_with_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    got = decoded(encode(rgba, "PNG"))
    assert got.shape == (4, 4, 3) and tuple(got[0, 0]) == (10, 20, 30) and tuple(got[1, 1]) == (255, 255, 255)
    grey = decoded(encode(Image.new("L", (4, 4), 77), "PNG"))
    assert grey.shape == (4, 4, 3) and (grey == 77).all()
    cmyk = decoded(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk.shape == (8, 8, 3) and cmyk[..., 0].min() > 240 and cmyk[..., 1:].max() < 15  # red
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] * 256)
    pal.info["transparency"] = 0
    assert tuple(decoded(encode(pal, "PNG"))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("name", list(hostile()))
def test_hostile_images_get_their_4xx_before_any_pixel_is_decoded_where_the_header_tells(name, monkeypatch):
    data, status = hostile()[name]
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real(self))
    with pytest.raises((InvalidInput, LimitExceeded)) as caught:
        decoded(data)
    assert caught.value.status_code == status, str(caught.value)
    assert "'images'" in str(caught.value)
    if status == 413:
        assert loads == []  # refused from the header: the pixels were never allocated


def test_bytes_and_base64_are_held_to_max_image_bytes_before_decoding():
    small = ImageLimits(max_bytes=1000)
    data = encode(photo(), "PNG")
    with pytest.raises(LimitExceeded, match="max_image_bytes"):
        decoded(data, small)
    with pytest.raises(LimitExceeded, match="max_image_bytes"):
        decoded("A" * 2000, small)  # not even decoded: too long as base64 text
    for bad, match in (("not base64!", "not base64"), ("data:image/png,AAAA", "without ';base64,'"), (7, "must be")):
        with pytest.raises(InvalidInput, match=match):
            decoded(bad)


def test_the_pixel_limit_is_a_setting():
    with pytest.raises(LimitExceeded, match="640 x 480 = 307200 pixels"):
        decoded(encode(photo(), "PNG"), ImageLimits(max_pixels=300_000))
    assert decoded(encode(photo(), "PNG"), ImageLimits(max_pixels=307_200)).shape == (480, 640, 3)


def test_the_pixel_budget_lets_at_most_its_capacity_decode_at_once():
    budget = PixelBudget(100)
    budget.take(60)
    budget.take(40)
    third = threading.Thread(target=budget.take, args=(50,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # waits: 100 taken
    budget.give(60)
    third.join(5)
    assert not third.is_alive() and budget.used == 90
    budget.give(40)
    budget.give(50)
    big = threading.Thread(target=budget.take, args=(500,))  # over capacity, alone: it goes
    big.start()
    big.join(5)
    assert not big.is_alive()


# --- preprocessing ------------------------------------------------------------------------------
PROCESSORS = {
    "ViTImageProcessor": {"size": {"height": 64, "width": 64}},
    "DeiTImageProcessor": {"size": {"height": 72, "width": 72}, "crop_size": {"height": 64, "width": 64}},
    "BeitImageProcessor": {"size": {"height": 72, "width": 72}, "crop_size": {"height": 64, "width": 64},
                           "do_center_crop": True},
    "SiglipImageProcessor": {"size": {"height": 64, "width": 64}},
    "CLIPImageProcessor": {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}},
    "BitImageProcessor": {"size": {"shortest_edge": 64}, "crop_size": {"height": 56, "width": 56}},
    "ConvNextImageProcessor": {"size": {"shortest_edge": 64}, "crop_pct": 0.875},
    "ConvNextImageProcessor-384": {"size": {"shortest_edge": 384}},
}  # fmt: skip


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_the_steps_reproduce_transformers_processor(name, tmp_path):
    processor = getattr(transformers, name.split("-")[0])(**PROCESSORS[name])
    processor.save_pretrained(tmp_path)
    steps = ImageSteps.from_processor_config(json.loads((tmp_path / "preprocessor_config.json").read_text()), name)
    for h, w in ((480, 640), (640, 480), (100, 333), (37, 512), (20, 20)):
        img = photo(h, w, seed=h)
        want = processor(images=img, return_tensors="np")["pixel_values"][0]
        got = steps.apply(img, "x", LIMITS.max_pixels)
        assert got.shape == want.shape == steps.shape() and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_processors_and_sizes_are_refused_at_load():
    with pytest.raises(ValueError, match="'LayoutLMv3ImageProcessor' is not one binserve reproduces"):
        ImageSteps.from_processor_config({"image_processor_type": "LayoutLMv3ImageProcessor"}, "cfg")
    with pytest.raises(ValueError, match="not one binserve reproduces"):
        ImageSteps.from_processor_config({"image_processor_type": "CLIPImageProcessor",
                                          "size": {"shortest_edge": 8, "longest_edge": 9}}, "cfg")  # fmt: skip


def test_a_shortest_edge_resize_of_an_extreme_strip_is_refused_before_it_runs():
    steps = ImageSteps(("shortest_edge", 224), crop=(224, 224))
    img = decode_image(strip(), "'images'", LIMITS)
    with pytest.raises(LimitExceeded, match="224 x 22400000 pixels"):
        steps.apply(img, "'images'", LIMITS.max_pixels)
    exact = ImageSteps(("exact", (64, 64)))
    assert exact.apply(img, "'images'", LIMITS.max_pixels).shape == (3, 64, 64)  # a fixed resize is harmless


def test_manifest_steps_make_the_declared_array():
    steps = ImageSteps.from_manifest({"resample": "bilinear"}, (480, 640, 3), np.dtype(np.uint8), "input 'image'")
    img = photo(240, 320)
    out = steps.apply(img, "x", LIMITS.max_pixels)
    assert out.shape == (480, 640, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.resize((640, 480), Image.BILINEAR)))
    norm = ImageSteps.from_manifest(
        {"resize": {"shortest_edge": 32}, "center_crop": {"height": 32, "width": 32}, "rescale": 1 / 255,
         "mean": [0.5] * 3, "std": [0.25] * 3}, (3, 32, 32), np.dtype(np.float32), "x")  # fmt: skip
    got = norm.apply(img, "x", LIMITS.max_pixels)
    want = (np.asarray(img.resize((42, 32), Image.BILINEAR))[:, 5:37] / 255 - 0.5) / 0.25
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), atol=1e-5)
    for spec, shape, dtype, match in (
        ({"rescale": 0.1}, (8, 8, 3), np.uint8, "need a float input"),
        ({"resize": {"height": 9, "width": 8}}, (8, 8, 3), np.uint8, "must end at the input's size"),
        ({}, (8, 8), np.uint8, "needs a shape"),
        ({"resample": "magic"}, (8, 8, 3), np.uint8, "resample"),
    ):
        with pytest.raises(ValueError, match=match):
            ImageSteps.from_manifest(spec, shape, np.dtype(dtype), "x")


def test_a_request_is_counted_and_sized_before_any_image_is_decoded(monkeypatch):
    steps = ImageSteps(("exact", (64, 64)), rescale=1 / 255)
    monkeypatch.setattr(images, "decode_image", lambda *a: pytest.fail("decoded before the count was checked"))

    def at_most_4(n, what):
        if n > 4:
            raise LimitExceeded(f"{what} holds {n} samples")

    with pytest.raises(LimitExceeded, match="holds 5 samples"):
        prepared([b"x"] * 5, "images", steps, LIMITS, 1 << 30, at_most_4)
    with pytest.raises(LimitExceeded, match="max_decoded_bytes"):  # 3 x 3 x 64 x 64 x 4 bytes > 100000
        prepared([b"x"] * 3, "images", steps, LIMITS, 100_000, at_most_4)
    with pytest.raises(InvalidInput, match="empty list"):
        prepared([], "images", steps, LIMITS, 1 << 30, at_most_4)


def test_prepared_mirrors_one_image_or_a_list_and_times_the_work():
    steps = ImageSteps(("exact", (16, 16)), rescale=1 / 255)
    one, batched, seconds = prepared(encode(photo(), "PNG"), "images", steps, LIMITS, 1 << 30, lambda n, w: None)
    assert len(one) == 1 and not batched and seconds > 0 and one[0].shape == (3, 16, 16)
    many, batched, _ = prepared([encode(photo(30, 40, s), "JPEG") for s in range(3)], "images", steps, LIMITS,
                                1 << 30, lambda n, w: None)  # fmt: skip
    assert len(many) == 3 and batched


def test_a_multi_picture_jpeg_decodes_its_first_picture():
    """MPO (many cameras write it: the photo and its previews) is one photo, not an animation."""
    import io

    first, second = photo(48, 64), photo(48, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second], quality=95)
    data = buf.getvalue()
    opened = Image.open(io.BytesIO(data))
    assert opened.format == "MPO" and opened.n_frames == 2
    np.testing.assert_array_equal(decoded(data), np.asarray(opened.convert("RGB")))  # frame 0
    gif = io.BytesIO()  # a real animation is still refused
    first.save(gif, "WEBP", save_all=True, append_images=[second])
    with pytest.raises(InvalidInput, match="animated"):
        decoded(gif.getvalue())


def test_a_legacy_feature_extractor_config_is_read_as_transformers_reads_it():
    """google/vit-base-patch16-224's preprocessor_config.json names only `feature_extractor_type`."""
    legacy = {"feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": 32, "resample": 2,
              "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
    steps = ImageSteps.from_processor_config(legacy, "legacy")
    modern = ImageSteps.from_processor_config({**legacy, "image_processor_type": "ViTImageProcessor"}, "modern")
    assert steps == modern
    img = photo(40, 70)
    want = transformers.ViTImageProcessor(**legacy)(img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(steps.apply(img, "x", LIMITS.max_pixels), want, atol=1e-5)
    with pytest.raises(ValueError, match="'MagicImageProcessor' is not one binserve reproduces"):
        ImageSteps.from_processor_config({"feature_extractor_type": "MagicFeatureExtractor"}, "x")


def test_the_pixel_budget_holds_what_the_resize_makes_until_the_array_is_made(monkeypatch):
    """A 10 x 10 image resized to 200 x 200 holds 100 + 40,000 pixels, not 100."""
    held = []

    class Recording(PixelBudget):
        def take(self, pixels):
            held.append(pixels)
            super().take(pixels)

    budget = Recording(2 * LIMITS.max_pixels)
    monkeypatch.setattr(images, "budget_for", lambda limits: budget)
    steps = ImageSteps(("exact", (200, 200)), rescale=1 / 255)
    out = decode_image(encode(photo(10, 10), "PNG"), "'images'", LIMITS, steps)
    assert out.shape == (3, 200, 200) and held == [100 + 200 * 200] and budget.used == 0
    tiny = ImageLimits(max_pixels=30_000)  # the resize alone would be over the limit: refused before decoding
    with pytest.raises(LimitExceeded, match="would be resized to 200 x 200"):
        decode_image(encode(photo(10, 10), "PNG"), "'images'", tiny, steps)
    assert held == [100 + 200 * 200]
