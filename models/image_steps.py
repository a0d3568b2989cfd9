"""What a model does to a decoded image before its forward pass: resize, crop, rescale, normalise.

design: one small description (`ImageSteps`) read from either place a model declares it - a Hugging
Face directory's `preprocessor_config.json` (`from_processor_config`: the ViT, DeiT, BEiT, SigLIP,
CLIP, BiT/DINOv2 and ConvNeXt processors, whose semantics are reproduced here and checked against
transformers' own in the tests) or a torch_module manifest's input (`from_manifest`) - and applied
with Pillow (the resize, on the uint8 image, as transformers' Pillow backend does) and numpy (one
fused rescale-and-normalise). Every sample comes out at one fixed shape, so images of any size batch
together. The size a resize would produce is known before it runs (`resized`), so a 1 x 100000
strip, which a shortest-edge resize would blow up to 224 x 22 million, is refused first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from binserve.errors import LimitExceeded

#: Pillow's resampling filters by the names a manifest uses (config files give Pillow's numbers)
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# processors whose `size` as a plain int means the shortest edge (the others: a square)
_SHORTEST_EDGE = {"CLIPImageProcessor", "ChineseCLIPImageProcessor", "BitImageProcessor", "ConvNextImageProcessor"}
#: the processors whose steps this reproduces (their Fast and Pil variants too)
PROCESSORS = _SHORTEST_EDGE | {"ViTImageProcessor", "DeiTImageProcessor", "BeitImageProcessor", "SiglipImageProcessor"}


@dataclass(frozen=True)
class ImageSteps:
    """A decoded RGB image -> one array of `shape` (CHW float32 for Hugging Face models)."""

    #: ("exact", (h, w)), ("shortest_edge", n), ("crop_pct", (n, pct)) as ConvNeXt does, or None
    resize: tuple | None
    resample: int = RESAMPLE["bilinear"]
    crop: tuple[int, int] | None = None  # (h, w), centred
    rescale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "CHW"
    dtype: str = "float32"

    @classmethod
    def from_processor_config(cls, cfg: dict, where: str) -> ImageSteps:
        """The steps a `preprocessor_config.json` describes; ValueError for a processor not reproduced.
        A legacy config names a `feature_extractor_type` (google/vit-base-patch16-224's
        `ViTFeatureExtractor`) and no image processor: transformers loads it as the image processor
        of the same name (`...FeatureExtractor` -> `...ImageProcessor`), and so does this."""
        kind = cfg.get("image_processor_type") or str(cfg.get("feature_extractor_type") or "").replace(
            "FeatureExtractor", "ImageProcessor"
        )
        kind = str(kind).removesuffix("Fast").removesuffix("Pil")
        if kind not in PROCESSORS:
            raise ValueError(
                f"{where}: image processor {kind or '(none)'!r} is not one binserve reproduces; "
                f"known: {sorted(PROCESSORS)}"
            )
        resize = None
        if cfg.get("do_resize", True):
            size = cfg.get("size", 224)
            if isinstance(size, int):
                size = {"shortest_edge": size} if kind in _SHORTEST_EDGE else {"height": size, "width": size}
            if "height" in size and "width" in size:
                resize = ("exact", (int(size["height"]), int(size["width"])))
            elif kind == "ConvNextImageProcessor":
                resize = ("crop_pct", (int(size["shortest_edge"]), float(cfg.get("crop_pct") or 224 / 256)))
            elif "shortest_edge" in size and "longest_edge" not in size:
                resize = ("shortest_edge", int(size["shortest_edge"]))
            else:
                raise ValueError(f"{where}: resize size {size} is not one binserve reproduces")
        crop = None
        if cfg.get("do_center_crop", False):
            c = cfg.get("crop_size", 224)
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        mean = std = None
        if cfg.get("do_normalize", True):
            mean, std = tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
        return cls(resize, int(cfg.get("resample", RESAMPLE["bilinear"])), crop, rescale, mean, std)

    @classmethod
    def from_manifest(cls, spec: dict, shape: tuple[int, ...], dtype: np.dtype, where: str) -> ImageSteps:
        """The steps a torch_module input declares under `image`, for an input of `shape` and `dtype`:
        `resize` ({height, width} or {shortest_edge}), `center_crop` ({height, width}), `resample`
        (a name), and for float inputs `rescale`, `mean` and `std`. Layout and size come from the shape."""
        if len(shape) != 3 or 3 not in (shape[0], shape[-1]):
            raise ValueError(f"{where}: an image input needs a shape (3, H, W) or (H, W, 3), got {list(shape)}")
        layout = "HWC" if shape[-1] == 3 else "CHW"
        out_hw = shape[:2] if layout == "HWC" else shape[1:]
        size = spec.get("resize", {"height": out_hw[0], "width": out_hw[1]})
        resize = ("shortest_edge", int(size["shortest_edge"])) if "shortest_edge" in size else (
            "exact", (int(size["height"]), int(size["width"])))  # fmt: skip
        crop = spec.get("center_crop")
        crop = (int(crop["height"]), int(crop["width"])) if crop else None
        resample = spec.get("resample", "bilinear")
        if resample not in RESAMPLE:
            raise ValueError(f"{where}: resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        floats = np.dtype(dtype).kind == "f"
        if not floats and any(k in spec for k in ("rescale", "mean", "std")):
            raise ValueError(f"{where}: rescale, mean and std need a float input, not {np.dtype(dtype)}")
        mean, std = spec.get("mean"), spec.get("std")
        steps = cls(
            resize, RESAMPLE[resample], crop, float(spec["rescale"]) if "rescale" in spec else None,
            tuple(map(float, mean)) if mean else None, tuple(map(float, std)) if std else None,
            layout, str(np.dtype(dtype)),
        )  # fmt: skip
        final = crop or (resize[1] if resize[0] == "exact" else None)
        if final != tuple(out_hw):
            raise ValueError(
                f"{where}: the steps must end at the input's size {tuple(out_hw)} (an exact resize or a "
                f"center_crop), not {final or 'a size that follows the image'}"
            )
        return steps

    def resized(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) after the resize of an image of `hw` (before any crop)."""
        if self.resize is None:
            return hw
        mode, arg = self.resize
        if mode == "exact":
            return arg
        if mode == "crop_pct":
            edge, pct = arg
            if edge >= 384:
                return (edge, edge)
            arg = int(edge / pct)
        h, w = hw
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(arg * long / short)
        return (new_long, arg) if w <= h else (arg, new_long)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the output for an image of `hw`."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "crop_pct" and self.resize[1][0] < 384:
            return (self.resize[1][0],) * 2
        return self.resized(hw)

    def shape(self) -> tuple[int, ...] | None:
        """The output's fixed shape, or None when it follows the image (no resize, no crop)."""
        if self.resize is None and self.crop is None:
            return None
        if self.resize is not None and self.resize[0] == "shortest_edge" and self.crop is None:
            return None
        h, w = self.output_hw((1, 1))
        return (3, h, w) if self.layout == "CHW" else (h, w, 3)

    def apply(self, img: Image.Image, where: str, max_pixels: int) -> np.ndarray:
        """The model's input array for one decoded RGB image."""
        h, w = self.resized((img.height, img.width))
        if h * w > max_pixels:
            raise LimitExceeded(
                f"{where} ({img.width} x {img.height}) would be resized to {w} x {h} pixels, over the "
                f"{max_pixels}-pixel limit (max_image_pixels): its aspect ratio is too extreme"
            )
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img)
        crop = self.crop
        if crop is None and self.resize is not None and self.resize[0] == "crop_pct" and self.resize[1][0] < 384:
            crop = (self.resize[1][0],) * 2
        if crop is not None:
            arr = center_crop(arr, crop)
        if self.dtype == "uint8":
            out = arr
        else:
            out = arr.astype(np.float32)
            scale = self.rescale if self.rescale is not None else 1.0
            if self.mean is not None:  # (x * scale - mean) / std, as one multiply and one subtract
                std = np.asarray(self.std, np.float32)
                out *= np.float32(scale) / std
                out -= np.asarray(self.mean, np.float32) / std
            elif scale != 1.0:
                out *= np.float32(scale)
        if self.layout == "CHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out, dtype=self.dtype)


def center_crop(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The centre (h, w) of an HWC array, zero-padded where the image is smaller (transformers' rule)."""
    ch, cw = hw
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, *arr.shape[2:]), arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
