"""Image records for sampling: class labels, inpainting regions, grids and raw arrays.

A pixels record is the field ``image`` (``(H, W, C)`` values 0..255) and,
when the model was trained with labels, the field ``label``. For sampling
the image is all MISSING (or, when inpainting, MISSING outside the kept
region), the label given or MISSING (then it is sampled too).

A kept region (``--keep``) is ``top``, ``bottom``, ``left`` or ``right``
(half the image; ``top:0.25`` a quarter) or a pixel box ``Y0:Y1,X0:X1``
(rows Y0..Y1-1, columns X0..X1-1).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

from maskdiff.errors import UserError
from maskdiff.files import atomic_path
from .generation import encode_category
from maskdiff.core.tokens import MISSING, Field, Record

SIDES = ("top", "bottom", "left", "right")
BOX = re.compile(r"^(\d+):(\d+),(\d+):(\d+)$")


def keep_mask(region: str, height: int, width: int) -> np.ndarray:
    """(H, W) boolean mask of the pixels to keep for a region description."""
    mask = np.zeros((height, width), dtype=bool)
    side, _, frac_text = region.strip().lower().partition(":")
    if side in SIDES:
        try:
            frac = float(frac_text) if frac_text else 0.5
        except ValueError:
            raise UserError(f"--keep {region!r}: the fraction after ':' must be a number, e.g. top:0.25") from None
        if not 0 < frac <= 1:
            raise UserError(f"--keep {region!r}: the fraction must be in (0, 1]")
        rows, cols = max(1, round(height * frac)), max(1, round(width * frac))
        if side == "top":
            mask[:rows] = True
        elif side == "bottom":
            mask[height - rows :] = True
        elif side == "left":
            mask[:, :cols] = True
        else:
            mask[:, width - cols :] = True
        return mask
    m = BOX.match(region.strip())
    if not m:
        raise UserError(f"--keep {region!r}: expected top, bottom, left, right (optionally :FRACTION) or a box Y0:Y1,X0:X1")
    y0, y1, x0, x1 = map(int, m.groups())
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise UserError(f"--keep {region!r}: the box must lie inside the {height}x{width} image and be non-empty")
    mask[y0:y1, x0:x1] = True
    return mask


def image_records(adapter, num: int, labels: Sequence[str | None] = (), image: np.ndarray | None = None,
                  keep: np.ndarray | None = None) -> list[Record]:
    """``num`` records to sample: blank (or ``image`` outside ``keep``), labels cycled from ``labels`` (None = sampled)."""
    if adapter.shape is None:
        raise UserError("the model's pixels adapter has no image shape")
    h, w, c = adapter.shape
    if labels and any(v is not None for v in labels) and adapter.labels is None:
        raise UserError("--label: the model was trained without class labels")
    base = np.full((h, w, c), MISSING, dtype=np.int64)
    if image is not None:
        keep3 = np.broadcast_to((keep if keep is not None else np.zeros((h, w), bool))[:, :, None], (h, w, c))
        base = np.where(keep3, image.astype(np.int64), MISSING)
    records = []
    for i in range(num):
        fields = [Field("image", "pixels/value", base.copy())]
        if adapter.labels is not None:
            value = labels[i % len(labels)] if labels else None
            local = MISSING if value is None else encode_category(adapter.labels, value, "--label")
            fields.append(Field("label", "pixels/label", np.array([local])))
        records.append(Record(fields, {"index": i}))
    return records


def load_image(adapter, path: str | Path) -> np.ndarray:
    """One image file as the model's (H, W, C) uint8 array (resized if the training data were)."""
    from maskdiff.adapters import Rejected

    items = list(adapter.read([path]))
    if not items:
        raise UserError(f"{path}: holds no image")
    item = items[0]
    if isinstance(item, Rejected):
        raise UserError(f"{path}: {item.reason}")
    img = np.asarray(item[1]["image"])
    h, w, c = adapter.shape
    if img.shape[2] != c:
        img = img.mean(axis=2, keepdims=True).round().astype(np.uint8) if c == 1 else np.repeat(img, c, axis=2)
    if img.shape[:2] != (h, w):
        from PIL import Image

        pil = Image.fromarray(img[:, :, 0] if c == 1 else img)
        img = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        img = img[:, :, None] if img.ndim == 2 else img
    return img


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """(N, H, W, C) uint8 images as one PNG grid, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(t, nrow=nrow, padding=1, pad_value=1.0)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if images.shape[-1] == 1 else arr)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


def save_arrays(path: str | Path, images: np.ndarray, labels: Sequence[str | None]) -> Path:
    """The raw uint8 images (and labels, '' when none) as an .npz archive."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images.astype(np.uint8), labels=np.array(["" if v is None else v for v in labels]))
    return Path(path)


__all__ = ["image_records", "keep_mask", "load_image", "save_arrays", "save_grid"]
