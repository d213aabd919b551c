"""Text: byte-pair encoding through sentencepiece, lossless, cut into windows.

The BPE model is trained on the input (``vocab_size`` pieces, byte fallback on,
identity normalisation, no dummy prefix, whitespace kept, ``\\n`` a piece of its
own) or loaded from an existing sentencepiece ``.model``. Any UTF-8 text round
trips exactly: characters outside the pieces fall back to their UTF-8 bytes.
The one thing sentencepiece cannot represent is a literal U+2581 (its space
marker); a document that does not round trip is rejected with the reason.

A document (a whole file, a line, or a blank-line separated paragraph, per
``split``) is cut into windows of at most ``max_len`` tokens; cuts never fall
inside the bytes of one character, so the windows decode and concatenate back
to the document. Each window is one stored record (``meta``: ``id``,
``window``, ``windows``, ``offset`` in tokens).
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from maskdiff.core.tokens import Field, Record, Support

from .base import Adapter, InputError, Option, RawItem, Reject, Rejected, expand_inputs, open_text, options_from

SUPPORT = "text/bpe"
MODEL_FILE = "text-bpe.model"
MIN_VOCAB = 300  # 256 byte pieces + <unk> + "\n" + a few merges
TRAIN_PIECE = 4096  # characters per training sentence (at most 16 KiB of UTF-8, sentencepiece's limit below)


class TextAdapter(Adapter):
    modality = "text"
    default_schedule = "linear"
    keeps_lengths = True  # generation draws a text length from the training lengths
    name = "text-bpe"
    options_spec = (
        Option("vocab_size", "BPE vocabulary size when training (default 4096; a soft limit on small inputs)", int, metavar="N"),
        Option("model", "use an existing sentencepiece .model instead of training one", str, metavar="FILE"),
        Option("split", "what one document is: a whole file, each non-empty line, or each blank-line separated paragraph (default file)", str, ("file", "line", "paragraph")),
        Option("train_sentences", "at most this many lines are sampled to train the BPE model (default 2000000)", int, metavar="N"),
    )

    def __init__(self, vocab_size: int = 4096, model: str | None = None, max_len: int = 1024, split: str = "file", train_sentences: int = 2_000_000) -> None:
        super().__init__(**options_from(locals()))
        if model is None and vocab_size < MIN_VOCAB:
            raise InputError(f"--vocab-size {vocab_size}: too small; byte fallback needs at least {MIN_VOCAB} pieces")
        if max_len < 4:
            raise InputError(f"--max-len {max_len}: a text window needs at least 4 tokens")
        if split not in ("file", "line", "paragraph"):
            raise InputError(f"--split {split!r}: choose file, line or paragraph")
        self.max_len, self.split = max_len, split
        self._proto: bytes | None = None
        self._sp: spm.SentencePieceProcessor | None = None
        self._continuation: np.ndarray | None = None

    # --- reading ------------------------------------------------------------------
    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        for path, root in expand_inputs(paths):
            try:
                with open_text(path) as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                yield Rejected(str(path), f"not valid UTF-8 (byte {e.start}: {e.reason})")
                continue
            if self.split == "file":
                if not text.strip():
                    yield Rejected(str(path), "empty document" if not text else "only whitespace")
                else:
                    yield str(path), text
            elif self.split == "line":
                for i, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        yield f"{path}:{i}", line
            else:
                yield from self._paragraphs(path, text)

    @staticmethod
    def _paragraphs(path: Path, text: str) -> Iterator[tuple[str, str]]:
        para: list[str] = []
        start = 1
        for i, line in enumerate(text.splitlines(keepends=True) + ["\n"], 1):
            if line.strip():
                if not para:
                    start = i
                para.append(line)
            elif para:
                yield f"{path}:{start}", "".join(para).rstrip("\r\n")
                para = []

    # --- fitting --------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return self._proto is None and self.options["model"] is None

    def fit(self, raws: Iterable[str]) -> None:
        if self.options["model"] is not None:
            self._load_model_file(Path(self.options["model"]))
            return

        def lines() -> Iterator[str]:
            for doc in raws:
                for line in doc.split("\n"):  # long lines in pieces: sentencepiece skips sentences over its length limit
                    yield from (line[i : i + TRAIN_PIECE] for i in range(0, len(line), TRAIN_PIECE))

        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=buf, model_type="bpe", vocab_size=self.options["vocab_size"],
                hard_vocab_limit=False, byte_fallback=True, character_coverage=0.9999, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n"], unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, max_sentencepiece_length=16,
                input_sentence_size=self.options["train_sentences"], shuffle_input_sentence=True, max_sentence_length=4 * TRAIN_PIECE, num_threads=2, minloglevel=2,
            )
        except RuntimeError as e:
            raise InputError(f"text input: sentencepiece could not train a BPE model ({str(e).strip().splitlines()[-1]})") from None
        self._set_proto(buf.getvalue())

    def _load_model_file(self, path: Path) -> None:
        try:
            self._set_proto(path.read_bytes())
        except (OSError, RuntimeError) as e:
            raise InputError(f"{path}: not a readable sentencepiece model ({e})") from None

    def _set_proto(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor(model_proto=proto)
        cont = np.zeros(sp.get_piece_size(), dtype=bool)
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                value = int(sp.id_to_piece(i)[1:-1], 16)  # "<0xAB>"
                cont[i] = 0x80 <= value <= 0xBF
        self._proto, self._sp, self._continuation = proto, sp, cont

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            if self.options["model"] is None:
                raise RuntimeError("text adapter is not fitted: call fit() or load a model")
            self._load_model_file(Path(self.options["model"]))
        assert self._sp is not None
        return self._sp

    # --- encoding -------------------------------------------------------------------
    def encode(self, raw: str) -> Record:
        """The whole document as one record (see :meth:`encode_many` for windows)."""
        if not raw:
            raise Reject("empty document")
        sp = self.processor
        ids = sp.encode(raw)
        back = sp.decode(ids)
        if back != raw:
            at = next((i for i, (a, b) in enumerate(zip(raw, back)) if a != b), min(len(raw), len(back)))
            raise Reject(f"text does not round-trip through the BPE model at character {at} ({raw[at:at + 1]!r}; U+2581 cannot be represented)")
        return Record([Field("text", SUPPORT, np.asarray(ids, dtype=np.int64))], {})

    def encode_many(self, raw: str) -> list[Record]:
        ids = self.encode(raw)["text"].tokens
        assert self._continuation is not None
        cuts = [0]
        while len(ids) - cuts[-1] > self.max_len:
            end = cuts[-1] + self.max_len
            while end > cuts[-1] + 1 and self._continuation[ids[end]]:
                end -= 1  # never start a window inside one character's bytes
            cuts.append(end)
        cuts.append(len(ids))
        n = len(cuts) - 1
        return [Record([Field("text", SUPPORT, ids[a:b])], {"window": i, "windows": n, "offset": int(a)}) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

    def decode(self, record: Record) -> str:
        return self.processor.decode(record["text"].tokens.tolist())

    def supports(self) -> list[Support]:
        return [Support(SUPPORT, "text", self.processor.get_piece_size())]

    # --- persistence ----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_sp"] = d["_continuation"] = None  # rebuilt from the model bytes
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        if self._proto is not None:
            self._set_proto(self._proto)

    def _fitted_state(self, root_dir: str | Path | None) -> dict[str, Any]:
        self.processor  # loads a given model
        assert self._proto is not None
        digest = hashlib.sha256(self._proto).hexdigest()
        if root_dir is None:
            return {"model_b64": base64.b64encode(self._proto).decode(), "sha256": digest}
        (Path(root_dir) / MODEL_FILE).write_bytes(self._proto)
        return {"model_file": MODEL_FILE, "sha256": digest}

    def _load_fitted(self, fitted: dict[str, Any], root_dir: Path | None) -> None:
        if "model_b64" in fitted:
            proto = base64.b64decode(fitted["model_b64"])
        elif "model_file" in fitted:
            path = (root_dir or Path(".")) / fitted["model_file"]
            proto = path.read_bytes()
        else:
            return
        if "sha256" in fitted and hashlib.sha256(proto).hexdigest() != fitted["sha256"]:
            raise ValueError(f"sentencepiece model does not match its recorded sha256 {fitted['sha256']}")
        self._set_proto(proto)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["pieces"] = self.processor.get_piece_size()
        return d
