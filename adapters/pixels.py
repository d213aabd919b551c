"""Pixels: 8-bit grayscale or RGB images, one token per sub-pixel.

Inputs (recognised by content, gzipped or not where noted):

* image files (PNG, JPEG, BMP, GIF, TIFF, WebP via Pillow) — named, globbed, or
  found recursively in folders;
* ``.npy`` uint8 arrays: ``(H, W)`` one grayscale image, ``(H, W, 1|3)`` one
  image, ``(N, H, W)`` grayscale images, ``(N, H, W, C)`` images;
* ``.npz`` archives holding such an array (``images``/``x``/``x_train``/``data``
  or the only array) and optionally labels (``labels``/``y``/``y_train``);
* IDX files as MNIST ships them (magic 2051 images, 2049 labels; gzipped or
  not). IDX labels files among the inputs are paired with the IDX images
  files in input order.

A record is the field ``image`` (support ``pixels/value``, 256 values, tokens
of shape ``(H, W, C)`` in raster order) and, when the data have labels, the
field ``label`` (support ``pixels/label``, shape ``(1,)``). Labels come from an
IDX/npz labels source, from ``--labels FILE`` (IDX, ``.npy`` or one label per
line, in image order), or from the sub-folder names under a folder input. At
most ``max_labels`` label values are kept (the most frequent); other values
(beyond the cap, or unseen when fitting) go to an *other* bucket, or reject
the record with ``unseen=reject``.

Every image must have the data set's size (``--size HxW``, else the first
image's) and channel count; other sizes are rejected with the reason unless
``--resize`` is given (bilinear). Images that are not 8 bits per sample
(16-bit PNG, 1-bit, float), have an alpha channel, or cannot be decoded are
rejected. Palette images are expanded to RGB. The round trip is exact.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from maskdiff.core.tokens import Field, Record, Support, number_line

from .base import Adapter, CategoryVocab, InputError, Option, RawItem, Reject, Rejected, expand_inputs, open_binary, options_from

VALUE, LABEL = "pixels/value", "pixels/label"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FOLDER_SUFFIXES = IMAGE_SUFFIXES + (".npy", ".npz", "ubyte", "ubyte.gz", ".idx", ".idx.gz")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# intensities on a standardised number line: the model embeds each value's place beside its token,
# in and out, so that neighbouring intensities start out alike and the rare ones in between are not
# learned as 254 unrelated symbols
INTENSITY_COORDS = number_line(range(256))
IMAGE_KEYS, LABEL_KEYS = ("images", "x", "x_train", "data"), ("labels", "y", "y_train")


class PixelsAdapter(Adapter):
    modality = "pixels"
    default_schedule = "cosine"
    per_dim_support = VALUE  # bits/dim: the image alone, its label left out
    name = "pixels-u8"
    options_spec = (
        Option("size", "required image size HxW (default: the first image's size)", str, metavar="HxW"),
        Option("resize", "resize images of another size to --size (bilinear) instead of rejecting them", flag=True),
        Option("labels", "class labels in image order: an IDX labels file, a .npy array, or a text file with one label per line", str, metavar="FILE"),
        Option("label_from", "where labels come from for folder inputs: sub-folder names (folder), none, or auto = sub-folders when every image sits in one (default auto)", str, ("auto", "folder", "none")),
        Option("max_labels", "keep at most N label values, the rest share an 'other' bucket (default 1000)", int, metavar="N"),
        Option("unseen", "a value that is not a kept category (unseen when fitting, or beyond the cap): map it to the 'other' bucket or reject the record (default other)", str, ("other", "reject")),
    )

    def __init__(self, size: str | None = None, resize: bool = False, labels: str | None = None, label_from: str = "auto", max_labels: int = 1000, unseen: str = "other") -> None:
        super().__init__(**options_from(locals()))
        self.size = _parse_size(size) if size else None
        self.shape: tuple[int, int, int] | None = None
        self.labels: CategoryVocab | None = None
        self.number_line = True  # intensities carry INTENSITY_COORDS; False for shards and bundles written before
        self._fitted = False

    # --- reading ------------------------------------------------------------------
    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        files = expand_inputs(paths, FOLDER_SUFFIXES)
        extra = _load_label_file(Path(self.options["labels"])) if self.options["labels"] else None
        magic = {f: _idx_magic(f) for f, _ in files}
        idx_labels = [f for f, _ in files if magic[f] == 2049]
        idx_images = [f for f, _ in files if magic[f] == 2051]
        if idx_labels and len(idx_labels) != len(idx_images):
            raise InputError(f"{idx_labels[0]}: {len(idx_labels)} IDX labels file(s) for {len(idx_images)} IDX images file(s); give them in pairs")
        paired = dict(zip(idx_images, idx_labels))
        folder_labels = self._folder_labels(files)
        count = 0
        for path, root in files:
            if path in idx_labels:
                continue
            for rid, item in self._read_file(path, magic[path], paired.get(path)):
                if isinstance(item, Reject):
                    yield Rejected(rid, str(item))
                else:
                    label = item.get("label")
                    if extra is not None:
                        label = extra[count] if count < len(extra) else None
                    elif path in folder_labels:
                        label = folder_labels[path]
                    yield rid, {"image": item["image"], "label": label}
                count += 1
        if extra is not None and count != len(extra):
            raise InputError(f"{self.options['labels']}: holds {len(extra)} labels but the inputs hold {count} images")

    def _folder_labels(self, files: list[tuple[Path, Path | None]]) -> dict[Path, str]:
        mode = self.options["label_from"]
        if mode == "none":
            return {}
        by_root: dict[Path, list[Path]] = {}
        for f, root in files:
            if root is not None:
                by_root.setdefault(root, []).append(f)
        out: dict[Path, str] = {}
        for root, found in by_root.items():
            rel = [f.relative_to(root) for f in found]
            if mode == "auto" and not all(len(r.parts) > 1 for r in rel):
                continue
            out.update((f, r.parts[0]) for f, r in zip(found, rel) if len(r.parts) > 1)
        return out

    def _read_file(self, path: Path, magic: int | None, labels_path: Path | None) -> Iterator[tuple[str, dict[str, Any] | Reject]]:
        if magic == 2051:
            yield from _read_idx_images(path, labels_path)
            return
        if path.suffix.lower() in (".npy", ".npz") or path.name.lower().endswith((".npy.gz", ".npz.gz")):
            yield from _read_array_file(path)
            return
        yield str(path), _load_image(path)

    # --- fitting --------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return not self._fitted

    def fit(self, raws: Iterable[dict[str, Any]]) -> None:
        first: tuple[int, int, int] | None = None
        labels: list[str | None] = []
        for raw in raws:
            if first is None:
                first = tuple(raw["image"].shape)  # type: ignore[assignment]
            labels.append(raw.get("label"))
        if first is None:
            raise InputError("pixels input: no readable image to fit the image shape on")
        h, w = self.size or first[:2]
        self.shape = (h, w, first[2])
        has_labels = any(v is not None for v in labels)
        self.labels = CategoryVocab.fit(labels, self.options["max_labels"], self.options["unseen"]) if has_labels else None
        self._fitted = True

    # --- encoding -------------------------------------------------------------------
    def encode(self, raw: dict[str, Any]) -> Record:
        if self.shape is None:
            raise RuntimeError("pixels adapter is not fitted")
        img = np.asarray(raw["image"])
        h, w, c = self.shape
        meta: dict[str, Any] = {}
        if img.ndim != 3 or img.dtype != np.uint8:
            raise Reject(f"not an 8-bit image array (dtype {img.dtype}, shape {img.shape})")
        if img.shape[2] != c:
            raise Reject(f"{img.shape[2]} channel(s), this data set has {c}")
        if img.shape[:2] != (h, w):
            if not self.options["resize"]:
                raise Reject(f"size {img.shape[0]}x{img.shape[1]} differs from the data set's {h}x{w} (pass --resize to resize)")
            meta["resized_from"] = [int(img.shape[0]), int(img.shape[1])]
            img = _resize(img, h, w)
        fields = [Field("image", VALUE, img)]
        if self.labels is not None:
            fields.append(Field("label", LABEL, np.array([self.labels.encode(raw.get("label"), "label")])))
        return Record(fields, meta)

    def decode(self, record: Record) -> dict[str, Any]:
        out: dict[str, Any] = {"image": record["image"].tokens.astype(np.uint8), "label": None}
        if self.labels is not None and any(f.name == "label" for f in record.fields):
            out["label"] = self.labels.decode(int(record["label"].tokens[0]))
        return out

    def supports(self) -> list[Support]:
        sup = [Support(VALUE, "pixels", 256, INTENSITY_COORDS if self.number_line else None)]
        if self.labels is not None:
            sup.append(Support(LABEL, "pixels", self.labels.size))
        return sup

    # --- persistence ----------------------------------------------------------------
    def _fitted_state(self, root_dir: str | Path | None) -> dict[str, Any]:
        return {"shape": list(self.shape) if self.shape else None, "labels": self.labels.to_dict() if self.labels else None,
                "number_line": self.number_line}

    def _load_fitted(self, fitted: dict[str, Any], root_dir: Path | None) -> None:
        if fitted.get("shape"):
            self.shape = tuple(fitted["shape"])  # type: ignore[assignment]
            self.labels = CategoryVocab.from_dict(fitted["labels"]) if fitted.get("labels") else None
            self.number_line = bool(fitted.get("number_line", False))
            self._fitted = True

    def notes(self) -> list[str]:
        if self.number_line:
            return []
        return [f"{self.key} shards were written before intensities had a place on a number line: they are learned as 256 "
                "unrelated symbols, which follows a label less well; rebuild them (tools/shard.py --overwrite) to use it"]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["shape"] = list(self.shape) if self.shape else None
        d["labels"] = len(self.labels.categories) if self.labels else 0
        return d


# --- helpers ---------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise InputError(f"--size {text!r}: expected HxW, e.g. 28x28")


def _idx_magic(path: Path) -> int | None:
    """2051 (images) / 2049 (labels) for 8-bit IDX files, -1 for other IDX types, None otherwise."""
    try:
        with open_binary(path) as f:
            head = f.read(4)
    except (OSError, EOFError):
        return None
    if len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E) and 1 <= head[3] <= 4:
        if head[2] != 0x08:
            raise InputError(f"{path}: IDX data type 0x{head[2]:02X} is not unsigned 8-bit")
        return int.from_bytes(head, "big")
    return None


def _read_idx(path: Path) -> tuple[np.ndarray, int]:
    """The complete items of an IDX file and the number of items the header promises."""
    with open_binary(path) as f:
        data = f.read()
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise InputError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    complete = min(dims[0], body.size // item) if item else dims[0]
    return body[: complete * item].reshape([complete] + dims[1:]), dims[0]


def _read_idx_images(path: Path, labels_path: Path | None) -> Iterator[tuple[str, dict[str, Any] | Reject]]:
    images, promised = _read_idx(path)
    labels = None
    if labels_path is not None:
        labels, n_labels = _read_idx(labels_path)
        if n_labels != promised:
            raise InputError(f"{labels_path}: {n_labels} labels for the {promised} images of {path.name}")
    for i in range(promised):
        rid = f"{path}#{i}"
        if i >= len(images):
            yield rid, Reject("truncated IDX file: image data missing")
            continue
        img = images[i]
        label = str(int(labels[i])) if labels is not None and i < len(labels) else None
        yield rid, {"image": img[:, :, None] if img.ndim == 2 else img, "label": label}


def _read_array_file(path: Path) -> Iterator[tuple[str, dict[str, Any] | Reject]]:
    try:
        with open_binary(path) as f:
            loaded = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable numpy file ({e})") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        key = next((k for k in IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise InputError(f"{path}: npz holds {keys}; name the image array one of {IMAGE_KEYS}")
        arr = loaded[key]
        lkey = next((k for k in LABEL_KEYS if k in keys), None)
        labels = loaded[lkey] if lkey else None
    else:
        arr = loaded
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: array dtype {arr.dtype} is not 8-bit (uint8)")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3)):
        arr = arr[None]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise InputError(f"{path}: array shape {arr.shape} is not (N, H, W[, C]) or (H, W[, C])")
    if labels is not None and len(labels) != len(arr):
        raise InputError(f"{path}: {len(labels)} labels for {len(arr)} images")
    for i in range(len(arr)):
        yield f"{path}#{i}", {"image": arr[i], "label": None if labels is None else str(labels[i].item())}


def _load_label_file(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    if _idx_magic(path) == 2049:
        return [str(int(v)) for v in _read_idx(path)[0]]
    if path.suffix == ".npy":
        return [str(v.item()) for v in np.load(path, allow_pickle=False).reshape(-1)]
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


MAX_PIXELS = 1 << 24  # 4096x4096: far above any training size, far below what exhausts memory


def _load_image(path: Path) -> dict[str, Any] | Reject:
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        return Reject("empty image file")
    if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 26:
        depth, colour = head[24], head[25]
        if colour != 3 and depth != 8:
            return Reject(f"{depth}-bit PNG: only 8-bit images are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below instead
            img = Image.open(path)
        with img:
            if img.width * img.height > MAX_PIXELS:  # from the header, before any pixel is decoded
                return Reject(f"{img.width}x{img.height} image: larger than the {MAX_PIXELS:,} pixels accepted")
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                return Reject(f"{img.n_frames}-frame image: only single images are accepted")
            mode = img.mode
            if mode == "P" and "transparency" not in img.info:
                img, mode = img.convert("RGB"), "RGB"
            if mode not in ("L", "RGB"):
                return Reject(_mode_reason(mode))
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return Reject(f"unreadable image ({e})")
    return {"image": arr[:, :, None] if arr.ndim == 2 else arr, "label": None}


def _mode_reason(mode: str) -> str:
    if mode.startswith("I;16") or mode in ("I", "F"):
        return f"not an 8-bit image (Pillow mode {mode}): only 8-bit images are accepted"
    if mode == "1":
        return "1-bit image: only 8-bit images are accepted"
    if "A" in mode or mode == "P":
        return f"image has an alpha channel / transparency (mode {mode}): only grayscale or RGB are accepted"
    return f"colour mode {mode} is not grayscale or RGB"


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
    out = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out
