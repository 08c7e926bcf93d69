"""What a model expects of an image before its first layer: resize, crop, mean and std.

The weights do not say it; the family that trained them does, so each layout names the
preprocessing of its models (:attr:`vitconv.layouts.layout.Layout.preprocessing`), a
checkpoint that records its own (a Hugging Face ``preprocessor_config.json``, vitconv's
``vitconv_preprocessing`` metadata) overrides that, and every output with a place for it gets
it: a Hugging Face directory's ``preprocessor_config.json``, a timm directory's
``pretrained_cfg``, ONNX metadata, and ``vitconv predict``.

Two ways to fit an image to the model's square input: ``squash`` resizes both sides to the
size (Google's vit_jax, SigLIP, Hugging Face's ViTImageProcessor); ``shortest`` resizes the
shorter side to ``size / crop_pct`` and crops the centre (timm, DINOv2, CLIP).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from vitconv.errors import BadInputError, first_line
from vitconv.formats.json_doc import parse_json
from vitconv.runtime.labels import to_metadata
from vitconv.formats.provenance import Provenance

Triple = Tuple[float, float, float]
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
OPENAI_MEAN: Triple = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: Triple = (0.26862954, 0.26130258, 0.27577711)
HALF: Triple = (0.5, 0.5, 0.5)
#: The smallest centre crop taken as real (timm's models use 0.875..1, DINOv2's 224/256).
MIN_CROP_PCT = 0.1
#: Largest intermediate image of a shortest-side resize (48 MiB as RGB); beyond it only the
#: crop is resampled.
MAX_RESIZED_PIXELS = 1 << 24
#: PIL's resampling filter numbers, which Hugging Face's ``resample`` holds.
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}


@dataclass(frozen=True)
class Preprocessing:
    mean: Triple
    std: Triple
    interpolation: str  # "bilinear" | "bicubic"
    resize: str  # "squash" | "shortest"
    crop_pct: float  # "shortest": the crop's share of the resized shorter side
    source: str  # who says so, for reports and model cards

    def __post_init__(self):
        if self.interpolation not in PIL_RESAMPLE or self.resize not in ("squash", "shortest"):
            raise ValueError(f"unknown preprocessing {self.interpolation!r}/{self.resize!r}")
        numbers = [self.crop_pct, *self.mean, *self.std]
        if (len(self.mean) != 3 or len(self.std) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)):
            raise ValueError(f"mean and std must be three numbers each, crop_pct a number: {self}")
        # a crop below a tenth of the image, a std that is not a positive finite number or an
        # absurd mean: forged or broken metadata, never a model's (forged values would also make
        # the resize ask for gigapixels)
        if not (MIN_CROP_PCT <= self.crop_pct <= 1) or not all(math.isfinite(x) for x in numbers) \
                or min(self.std) <= 1e-6 or max(map(abs, self.mean)) > 1e3:
            raise ValueError(f"preprocessing out of range: {self}")

    def describe(self) -> str:
        fit = ("resize to the model's size" if self.resize == "squash" else
               f"resize the shorter side to size / {self.crop_pct:g}, centre crop")
        return (f"{fit} ({self.interpolation}), RGB / 255, mean {_fmt(self.mean)}, std {_fmt(self.std)}"
                f" ({self.source})")

    # ---- the outputs' own spellings -------------------------------------------------------
    def hf_processor(self, image_size: int) -> Dict[str, Any]:
        """``preprocessor_config.json`` for ``AutoImageProcessor``: ViTImageProcessor squashes,
        BitImageProcessor resizes the shorter side and crops."""
        d: Dict[str, Any] = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                             "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                             "resample": PIL_RESAMPLE[self.interpolation]}
        if self.resize == "squash":
            d.update(image_processor_type="ViTImageProcessor", size={"height": image_size, "width": image_size})
        else:
            d.update(image_processor_type="BitImageProcessor", do_center_crop=True, do_convert_rgb=True,
                     size={"shortest_edge": int(image_size / self.crop_pct)},
                     crop_size={"height": image_size, "width": image_size})
        return d

    def timm_cfg(self) -> Dict[str, Any]:
        """The ``pretrained_cfg`` fields timm's ``resolve_data_config`` reads."""
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct if self.resize == "shortest" else 1.0,
                "crop_mode": "center" if self.resize == "shortest" else "squash"}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    # ---- applying it ----------------------------------------------------------------------
    def apply(self, image, size: int) -> np.ndarray:
        """A PIL image as the model's ``(size, size, 3)`` float32 input (Hugging Face's
        arithmetic: PIL resize, integer centre crop, ``x / 255``, then mean and std)."""
        from PIL import Image

        img = image.convert("RGB")
        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        if self.resize == "squash":
            img = img.resize((size, size), resample)
        else:
            w, h = img.size
            short = int(size / self.crop_pct)
            nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            top, left = (nh - size) // 2, (nw - size) // 2
            if nw * nh <= MAX_RESIZED_PIXELS:  # Hugging Face's arithmetic, exactly
                img = img.resize((nw, nh), resample).crop((left, top, left + size, top + size))
            else:
                # An extreme aspect ratio (a 1 x 1,000,000 strip would resize to gigapixels):
                # Pillow resamples only the source box that maps onto the crop, at the whole
                # resize's scale (within 2/255 of resize-then-crop: its passes round apart).
                sx, sy = w / nw, h / nh
                img = img.resize((size, size), resample,
                                 box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
        x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _fmt(v: Triple) -> str:
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"


GOOGLE = Preprocessing(HALF, HALF, "bilinear", "squash", 1.0, "vit_jax's input pipeline: x / 127.5 - 1")
BIG_VISION = Preprocessing(HALF, HALF, "bilinear", "squash", 1.0, "big_vision: value_range(-1, 1)")
HF_VIT = Preprocessing(HALF, HALF, "bilinear", "squash", 1.0, "transformers ViTImageProcessor defaults")
JEONSWORLD = Preprocessing(HALF, HALF, "bilinear", "squash", 1.0, "jeonsworld ViT-pytorch's test transform")
SIGLIP = Preprocessing(HALF, HALF, "bicubic", "squash", 1.0, "SiglipImageProcessor")
DINOV2 = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bicubic", "shortest", 224 / 256,
                       "DINOv2's evaluation: resize 256, centre crop 224")
CLIP = Preprocessing(OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest", 1.0, "OpenAI CLIP's transform")
#: For layouts that do not say (a bare timm state dict): timm's defaults, named as a guess.
TIMM_DEFAULT = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bicubic", "shortest", 0.9,
                             "timm's defaults: the file does not record its preprocessing")


def from_json(text: str, where: Optional[os.PathLike | str] = None) -> Preprocessing:
    d = parse_json(text, "vitconv_preprocessing metadata", where)
    try:
        return Preprocessing(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
    except (TypeError, KeyError, ValueError, ArithmeticError) as e:
        raise BadInputError(f"invalid vitconv_preprocessing metadata ({first_line(e)})", where) from None


def from_timm_cfg(d: Dict[str, Any], where: Optional[os.PathLike | str] = None) -> Preprocessing:
    """A timm directory's ``pretrained_cfg`` (mean, std, interpolation, crop_pct, crop_mode)."""
    try:
        squash = d.get("crop_mode") == "squash"
        return Preprocessing(tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]),
                             d.get("interpolation", "bicubic"), "squash" if squash else "shortest",
                             1.0 if squash else float(d.get("crop_pct", 0.875)), "the source's pretrained_cfg")
    except (TypeError, ValueError, KeyError, ArithmeticError) as e:
        raise BadInputError(f"config.json: pretrained_cfg preprocessing is unusable ({first_line(e)})", where) from None


def from_hf_processor(d: object, where: Optional[os.PathLike | str] = None) -> Optional[Preprocessing]:
    """A source directory's ``preprocessor_config.json``, when it says enough; None otherwise."""
    if not isinstance(d, dict) or "image_mean" not in d or "image_std" not in d:
        return None
    resample = d.get("resample")
    if resample is not None and type(resample) is not int:
        raise BadInputError(f"preprocessor_config.json: resample {str(resample)[:40]} is not a PIL filter number", where)
    interpolation = {v: k for k, v in PIL_RESAMPLE.items()}.get(resample, "bicubic")
    size, crop = d.get("size") or {}, d.get("crop_size") or {}
    try:
        if d.get("do_center_crop") and isinstance(size, dict) and "shortest_edge" in size:
            side = crop.get("height", size["shortest_edge"]) if isinstance(crop, dict) else crop
            resize, crop_pct = "shortest", float(side) / float(size["shortest_edge"])
        else:
            resize, crop_pct = "squash", 1.0
        return Preprocessing(tuple(float(x) for x in d["image_mean"]), tuple(float(x) for x in d["image_std"]),
                             interpolation, resize, min(crop_pct, 1.0), "the source's preprocessor_config.json")
    except (TypeError, ValueError, KeyError, ArithmeticError) as e:  # a zero or a 400-digit size, too
        raise BadInputError(f"preprocessor_config.json: unusable values ({first_line(e)})", where) from None


@dataclass(frozen=True)
class Usage:
    """What a model's users need beyond its weights and architecture: its preprocessing and,
    for a classifier, its class names (None: unknown). Read from the source, written into
    every output with a place for them."""

    preprocessing: Preprocessing = TIMM_DEFAULT
    labels: Optional[Tuple[str, ...]] = None

    def provenance(self, config: Optional[str] = None) -> Provenance:
        """The preprocessing and (when known) the labels as provenance, with ``config``
        (a :meth:`ViTConfig.to_json`) where the output records the model's."""
        return Provenance(config=config, preprocessing=self.preprocessing.to_json(),
                          labels=to_metadata(self.labels) if self.labels else None)

    def metadata(self) -> Dict[str, str]:
        """``vitconv_preprocessing`` and (when known) ``vitconv_labels`` metadata strings."""
        return self.provenance().metadata()

    def id2label(self, num_classes: int) -> Dict[str, str]:
        names = self.labels or tuple(f"LABEL_{i}" for i in range(num_classes))
        return {str(i): name for i, name in enumerate(names)}
