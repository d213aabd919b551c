"""Shard-streaming test helpers: a local HTTP server (the ``served`` fixture, import it into a test module), a corrupted shard."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Iterator

import pytest


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a path in ``drop`` gets its full Content-Length but only that many bytes, then the connection closes."""

    drop: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        cut = self.drop.get(self.path)
        if cut is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(cut))
        outputfile.flush()
        self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that stops reading early is expected here
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, dict[str, int]]]:
    """A folder, the URL it is served at, and the handler's ``drop`` table."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (_Handler,), {"drop": {}})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", handler.drop
    server.shutdown()
    server.server_close()


def corrupt_first_header(shard: Path) -> None:
    """Flip the first byte of a shard's first tar header: no record of it can be read, and its checksum fails."""
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
