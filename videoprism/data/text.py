"""Caption tokenization as the official VideoPrism text encoder expects it (golden NOTES 7).

`canonicalize_text`: every ASCII punctuation character becomes a space, lower case, single spaces between words, a
final ".". `Tokenizer.encode`: SentencePiece pieces of the canonical text, a BOS id first only when the model has one
(`bos_id >= 0`; the official c4_en model has none), no EOS, truncated to `max_length` (64), right-padded with id 0;
`paddings` is 1.0 at padded positions and 0.0 at real tokens.
"""
from __future__ import annotations

import os
import re
import string

import torch

from ..paths import LONGEST_PATH, atomic_file, shown

MAX_TEXT_LENGTH = 64
_PUNCT_TO_SPACE = str.maketrans(string.punctuation, " " * len(string.punctuation))


def canonicalize_text(text: str) -> str:
    """"Hello,World.." -> "hello world." (the official preprocessing, applied before SentencePiece)."""
    return " ".join(text.translate(_PUNCT_TO_SPACE).lower().split()) + "."


class Tokenizer:
    """SentencePiece tokenizer producing `(ids int64 [B, L], paddings float32 [B, L])`."""

    def __init__(self, model_path: str | os.PathLike, max_length: int = MAX_TEXT_LENGTH):
        import sentencepiece as spm

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model {shown(model_path, LONGEST_PATH)} does not exist; pass "
                                    "the path of a .model file (`videoprism data synth` writes DIR/spm.model)")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model_path = model_path
        self.max_length = max_length
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except RuntimeError as e:  # sentencepiece raises RuntimeError("INTERNAL: could not parse ModelProto ...")
            raise ValueError(f"{shown(model_path, LONGEST_PATH)} is not a SentencePiece model ({e}); pass a "
                             ".model file (`videoprism data synth` writes DIR/spm.model)") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode_one(self, text: str) -> list[int]:
        """Ids of one caption, BOS-prefixed when the model has a BOS, truncated to `max_length`, not padded."""
        ids = self._sp.encode(canonicalize_text(text))
        if self._sp.bos_id() >= 0:
            ids = [self._sp.bos_id()] + ids
        return ids[: self.max_length]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of captions, got one str; wrap it: tokenizer([text])")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer takes a list of str captions, got a {type(text).__name__}: {text!r:.60}")
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.int64)
        paddings = torch.ones(len(texts), self.max_length, dtype=torch.float32)
        for row, text in enumerate(texts):
            tok = self.encode_one(text)
            ids[row, : len(tok)] = torch.tensor(tok, dtype=torch.int64)
            paddings[row, : len(tok)] = 0.0
        return ids, paddings


def train_spm(captions: list[str], model_path: str, vocab_size: int = 128) -> None:
    """A SentencePiece BPE model on the canonical captions (as `Tokenizer` canonicalises them), ids laid out like
    the official c4_en's (pad 0, eos 1, unk 2), at most `vocab_size` pieces (fewer when the captions hold fewer)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    texts = [canonicalize_text(c) for c in captions]
    try:
        # max_sentence_length: SentencePiece skips longer sentences silently (4192 bytes by default), and their
        # words came out as <unk>.
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                       model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                       max_sentence_length=max([4192, *(len(t.encode()) + 1 for t in texts)]))
    except RuntimeError as e:
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if need is None:
            raise
        raise ValueError(f"a vocabulary of {vocab_size} pieces is too small for these captions: their characters "
                         f"and the special pieces need {need.group(1)}; use --vocab-size {need.group(1)} or "
                         "more") from None
    with atomic_file(model_path, "wb") as f:  # a kill or a full disk mid-write: the previous model, not a cut one
        f.write(buf.getvalue())
