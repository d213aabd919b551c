"""Pixels adapter: exact round trips of real MNIST from IDX, PNG folders and arrays; rejects."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from adapter_fixtures import MNIST_IMAGES, MNIST_LABELS, mnist_arrays, mnist_png_folder, read_all, scratch
from PIL import Image

from maskdiff.adapters import OTHER, InputError, PixelsAdapter, Reject, Rejected, adapter_from_state
from maskdiff.core.tokens import MISSING


def test_mnist_idx_round_trip_with_labels():
    adapter, raws, rejects = read_all("pixels", [MNIST_IMAGES, MNIST_LABELS])
    images, labels = mnist_arrays(10_000)
    assert rejects == [] and len(raws) == 10_000
    assert {s.name: s.size for s in adapter.supports()} == {"pixels/value": 256, "pixels/label": 11}
    for i, (rid, raw) in enumerate(raws):
        rec = adapter.encode(raw)
        assert rec["image"].shape == (28, 28, 1) and rec["label"].shape == (1,)
        assert rec["image"].support == "pixels/value" and rec["label"].support == "pixels/label"
        back = adapter.decode(rec)
        assert back["image"].dtype == np.uint8 and np.array_equal(back["image"][:, :, 0], images[i])
        assert back["label"] == str(labels[i])
    assert rid.endswith("#9999")
    assert adapter.labels is not None and adapter.labels.categories == [str(d) for d in range(10)]


def test_png_folder_labels_from_subfolders_and_state():
    root = mnist_png_folder(scratch("png-folder"), n=40)
    adapter, raws, rejects = read_all("pixels", [root])
    images, labels = mnist_arrays(40)
    assert rejects == [] and len(raws) == 40
    by_index = {int(rid.rsplit("/", 1)[-1][:4]): raw for rid, raw in raws}
    for i in range(40):
        assert by_index[i]["label"] == str(labels[i])
        back = adapter.decode(adapter.encode(by_index[i]))
        assert np.array_equal(back["image"][:, :, 0], images[i]) and back["label"] == str(labels[i])
    loaded = adapter_from_state(adapter.state())
    assert loaded.shape == (28, 28, 1) and loaded.fingerprint() == adapter.fingerprint()
    none = PixelsAdapter(label_from="none")
    none.fit(raw for _, raw in none.read([root]) if True)
    assert [s.name for s in none.supports()] == ["pixels/value"]


def test_intensities_lie_on_a_number_line_and_older_states_keep_their_layout_with_a_note():
    root = mnist_png_folder(scratch("number-line"), n=12)
    adapter, _, _ = read_all("pixels", [root])
    coords = np.array(adapter.supports()[0].coords)
    assert coords.shape == (256,) and np.all(np.diff(coords) > 0)  # ordered like the intensities, evenly spaced
    assert np.allclose(np.diff(coords), coords[1] - coords[0]) and abs(coords.mean()) < 1e-9 and abs(coords.std() - 1) < 1e-9
    assert adapter_from_state(adapter.state()).supports() == adapter.supports()
    older = adapter.state()
    del older["fitted"]["number_line"]  # shards and bundles written before intensities had coordinates
    assert adapter_from_state(older).supports()[0].coords is None
    # a run opening such shards says so, with the way out; current ones say nothing
    assert adapter.notes() == [] and "tools/shard.py --overwrite" in adapter_from_state(older).notes()[0]


def test_rgb_arrays_npy_npz_and_labels_file():
    root = scratch("arrays")
    images, labels = mnist_arrays(12)
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)  # (12, 28, 28, 3)
    np.save(root / "rgb.npy", rgb)
    np.savez(root / "gray.npz", images=images, labels=labels)
    (root / "labels.txt").write_text("".join(f"digit{v}\n" for v in labels))
    adapter, raws, rejects = read_all("pixels", [root / "rgb.npy"], labels=str(root / "labels.txt"))
    assert len(raws) == 12 and adapter.shape == (28, 28, 3)
    for i, (_, raw) in enumerate(raws):
        back = adapter.decode(adapter.encode(raw))
        assert np.array_equal(back["image"], rgb[i]) and back["label"] == f"digit{labels[i]}"
    adapter, raws, _ = read_all("pixels", [root / "gray.npz"])
    assert [raw["label"] for _, raw in raws] == [str(v) for v in labels]
    with pytest.raises(InputError, match="holds 12 labels but the inputs hold 24"):
        read_all("pixels", [root / "rgb.npy", root / "gray.npz"], labels=str(root / "labels.txt"))


def test_bad_images_are_rejected_with_reasons():
    root = mnist_png_folder(scratch("bad-images"), n=5)
    images, _ = mnist_arrays(5)
    bad = root / "bad"
    bad.mkdir()
    Image.fromarray(images[0].astype(np.uint16) * 257).save(bad / "deep16.png")
    assert Image.open(bad / "deep16.png").mode.startswith("I")
    good_png = (root / "7" / "0000.png").read_bytes()
    (bad / "corrupt.png").write_bytes(good_png[: len(good_png) // 2])
    (bad / "empty.png").write_bytes(b"")
    Image.fromarray(np.dstack([images[1]] * 4)).save(bad / "alpha.png")
    Image.fromarray(images[2][:20, :20]).save(bad / "small.png")
    (bad / "garbage.jpg").write_bytes(b"this is not an image at all")
    adapter = PixelsAdapter(label_from="none")
    items = list(adapter.read([root]))
    rejects = {r.id.rsplit("/", 1)[-1]: r.reason for r in items if isinstance(r, Rejected)}
    assert set(rejects) == {"deep16.png", "corrupt.png", "empty.png", "alpha.png", "garbage.jpg"}
    assert "16-bit" in rejects["deep16.png"] and "8-bit" in rejects["deep16.png"]
    assert "unreadable" in rejects["corrupt.png"] and "unreadable" in rejects["garbage.jpg"]
    assert "alpha" in rejects["alpha.png"] and "empty" in rejects["empty.png"]
    raws = [r for r in items if not isinstance(r, Rejected)]
    assert len(raws) == 6
    adapter.fit(raw for _, raw in raws)
    small = next(raw for rid, raw in raws if rid.endswith("small.png"))
    with pytest.raises(Reject, match="size 20x20 differs from the data set's 28x28.*--resize"):
        adapter.encode(small)
    resizing = PixelsAdapter(label_from="none", resize=True, size="28x28")
    resizing.fit(raw for _, raw in raws)
    rec = resizing.encode(small)
    assert rec["image"].shape == (28, 28, 1) and rec.meta["resized_from"] == [20, 20]
    rgb_raw = {"image": np.zeros((28, 28, 3), np.uint8), "label": None}
    with pytest.raises(Reject, match="3 channel"):
        adapter.encode(rgb_raw)


def test_truncated_idx_rejects_the_missing_images_and_unseen_labels():
    root = scratch("idx")
    with gzip.open(MNIST_IMAGES, "rb") as f:
        data = f.read(16 + 784 * 50)
    header = bytearray(data[:16])
    header[4:8] = (53).to_bytes(4, "big")  # promises 53 images, holds 50 (and a bit)
    (root / "trunc-idx3-ubyte").write_bytes(bytes(header) + data[16:] + b"\x00" * 100)
    items = list(PixelsAdapter().read([root / "trunc-idx3-ubyte"]))
    assert len(items) == 53
    assert [r.reason for r in items if isinstance(r, Rejected)] == ["truncated IDX file: image data missing"] * 3
    adapter, raws, _ = read_all("pixels", [MNIST_IMAGES, MNIST_LABELS], max_labels=3)
    assert adapter.labels.categories == ["1", "2", "7"]  # the three most frequent digits of the test split
    rare = next(raw for _, raw in raws if raw["label"] not in adapter.labels.categories)
    assert adapter.decode(adapter.encode(rare))["label"] == OTHER  # beyond the cap: the other bucket
    assert adapter.decode(adapter.encode({"image": rare["image"], "label": "cat"}))["label"] == OTHER
    assert adapter.encode({"image": rare["image"], "label": None})["label"].tokens[0] == MISSING
    strict, _, _ = read_all("pixels", [MNIST_IMAGES, MNIST_LABELS], max_labels=3, unseen="reject")
    with pytest.raises(Reject, match="not one of the 3 categories"):
        strict.encode(rare)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with a tiny (wrong) image body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [40000, 10000])
def test_huge_image_header_is_refused_before_decoding(side: int) -> None:
    import resource

    d = scratch(f"pixels-huge-{side}")
    (d / "huge.png").write_bytes(_png_header(side, side))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    items = list(PixelsAdapter().read([d / "huge.png"]))
    assert len(items) == 1 and isinstance(items[0], Rejected)
    assert "larger than" in items[0].reason or "decompression bomb" in items[0].reason.lower()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near side*side bytes was allocated


def test_truncated_png_header_is_rejected() -> None:
    d = scratch("pixels-truncated")
    (d / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    items = list(PixelsAdapter().read([d / "t.png"]))
    assert len(items) == 1 and isinstance(items[0], Rejected) and "unreadable image" in items[0].reason
