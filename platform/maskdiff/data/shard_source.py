"""Where a shard directory lives, and its files opened as byte streams.

A shard directory is named by

* a local path, or a ``file://`` URL;
* an ``http://`` / ``https://`` URL (urllib, streamed);
* ``pipe:CMD``, a webdataset pipe: CMD writes one file to its standard output,
  ``{}`` standing for the file name (``pipe:aws s3 cp s3://bucket/dir/{} -``);
* any other ``scheme://`` URL that fsspec reads (``s3://``, ``gs://``), when
  fsspec and that scheme's backend are installed.

:meth:`ShardLocation.open` streams one file; :class:`HashingStream` computes the
sha256 of what passed through it and turns transport failures into one-line
:class:`ShardError` messages naming the file. Nothing is held beyond the block
being read.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit
from urllib.request import url2pathname

from .shard_format import ShardError

HTTP_TIMEOUT_S = 60.0
BLOCK = 1 << 16


class MissingFile(ShardError):
    """A file of a shard directory is not there (no such file, HTTP 404); ``detail`` says how it showed."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


class ShardLocation:
    """A shard directory: a local folder or a URL (see the module docstring)."""

    def __init__(self, where: str | Path) -> None:
        text = str(where)
        self.scheme = "pipe" if text.startswith("pipe:") else (urlsplit(text).scheme if "://" in text else "")
        self.path: Path | None = None
        if self.scheme == "":
            self.path = Path(where)
        elif self.scheme == "file":
            self.path, self.scheme = Path(url2pathname(urlsplit(text).path)), ""
        self.where = str(self.path) if self.path is not None else text.rstrip("/")
        if self.scheme == "pipe" and "{}" not in text:
            raise ShardError(f"{text}: a pipe: shard directory needs {{}} where the file name goes, e.g. 'pipe:curl -sf https://host/dir/{{}}'")
        if self.scheme not in ("", "http", "https", "pipe"):
            _fsspec(text)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.where

    def __repr__(self) -> str:
        return f"ShardLocation({self.where!r})"

    def url(self, name: str) -> str:
        """Where the file ``name`` of this directory is (for opening and for messages)."""
        if self.path is not None:
            return str(self.path / name)
        if self.scheme == "pipe":
            return self.where.replace("{}", name)
        return f"{self.where}/{name}"

    def open(self, name: str) -> HashingStream:
        """Stream the file ``name``; :class:`MissingFile` when it is not there, :class:`ShardError` when it cannot be reached."""
        url = self.url(name)
        if self.path is not None:
            try:
                return HashingStream(open(url, "rb"), url)
            except FileNotFoundError:
                raise MissingFile(url, "no such file") from None
            except OSError as e:
                raise ShardError(f"{url}: cannot read ({e.strerror or e})") from None
        if self.scheme in ("http", "https"):
            try:
                return HashingStream(urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S), url)
            except urllib.error.HTTPError as e:
                if e.code in (404, 410):
                    raise MissingFile(url, f"HTTP {e.code} {e.reason}") from None
                raise ShardError(f"{url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                raise ShardError(f"{url}: cannot connect ({getattr(e, 'reason', None) or e})") from None
        if self.scheme == "pipe":
            import webdataset as wds

            return HashingStream(wds.gopen(url, "rb"), url)
        try:
            return HashingStream(_fsspec(url).open(url, "rb").open(), url)
        except FileNotFoundError:
            raise MissingFile(url, "no such file") from None
        except (OSError, ImportError, ValueError) as e:
            raise ShardError(f"{url}: cannot open ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None

    def read_bytes(self, name: str) -> bytes:
        """A small file of the directory (the manifest, an adapter's model file), whole."""
        stream = self.open(name)
        try:
            return b"".join(iter(lambda: stream.read(BLOCK), b""))
        finally:
            stream.close()


def _fsspec(url: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise ShardError(f"{url}: reading {urlsplit(url).scheme}:// shard directories needs fsspec (pip install fsspec "
                         f"and its backend, e.g. s3fs or gcsfs); or use an https:// URL or a pipe: command") from None
    return fsspec


class HashingStream:
    """A read-only byte stream that counts and hashes what passes through it.

    A failure of the transport (a dropped connection, a command that exits
    with an error) raises :class:`ShardError` naming the file, and is kept in
    ``failure`` for readers whose parser wraps exceptions.
    """

    def __init__(self, raw: Any, name: str) -> None:
        self.raw, self.name = raw, name
        self.sha, self.nbytes = hashlib.sha256(), 0
        self.failure: str | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
        except http.client.IncompleteRead as e:
            self._fail(f"the connection dropped after {self.nbytes + len(e.partial)} bytes")
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._check_command()
            self._fail(f"reading failed after {self.nbytes} bytes ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        if not data and n:
            self._check_command()
            if getattr(self.raw, "length", None):  # http.client ends early without raising
                self._fail(f"the connection dropped after {self.nbytes} bytes of {self.nbytes + self.raw.length}")
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def _check_command(self) -> None:
        """A pipe: command that ended with an error status fails the read."""
        proc = getattr(self.raw, "proc", None)  # webdataset's Pipe
        if proc is not None and proc.wait() != 0:
            self._fail(f"the command exited with status {proc.returncode} after {self.nbytes} bytes")

    def _fail(self, what: str) -> NoReturn:
        self.failure = f"{self.name}: {what}"
        raise ShardError(self.failure)

    def drain(self) -> None:
        """Read (and hash) the rest, block by block."""
        while self.read(BLOCK):
            pass

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        try:
            self.raw.close()
        except OSError:
            pass  # a pipe that exited with an error: already reported by read(), or the stream was left early


__all__ = ["HTTP_TIMEOUT_S", "HashingStream", "MissingFile", "ShardLocation"]
