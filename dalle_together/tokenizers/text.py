"""The text tokenizer: a small BPE trained on the data set's captions.

Ids ``0``, ``1`` and ``2`` are ``<pad>``, ``<bos>`` and ``<unk>``. A caption becomes
``[<bos>, tokens..., <pad>, ...]`` of exactly ``text_len`` ids; the empty caption is ``<bos>``
followed by padding, which is the unconditional caption that classifier-free guidance uses.

Text is normalised (NFKC, lower case, runs of white space collapsed) before it is split, so
``"A  Red Circle"`` and ``"a red circle"`` encode alike. Words are pre-tokenised SentencePiece
style (``▁`` marks a word start), so :meth:`TextTokenizer.decode` restores the spaces exactly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_together.checkpoint import write_json_atomic
from dalle_together.config import BOS_ID, PAD_ID, TextConfig
from dalle_together.errors import UserError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
UNK_ID = 2
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, UNK_TOKEN)
"""In id order: ``PAD_ID``, ``BOS_ID``, ``UNK_ID``."""

TEXT_TOKENIZER_FILE = "text_tokenizer.json"
_FORMAT = "dalle-together-text-tokenizer"
_FORMAT_VERSION = 1


def _blank_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


class TextTokenizer:
    """Captions to fixed-length id sequences and back.

    :param tokenizer: a trained HF ``tokenizers.Tokenizer`` whose first ids are the special tokens
    :param text_len: ids per caption, the leading ``<bos>`` included
    """

    def __init__(self, tokenizer: Tokenizer, *, text_len: int) -> None:
        for want_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != want_id:
                raise UserError(f"text tokenizer must have {token} at id {want_id}")
        if text_len < 1:
            raise UserError(f"text length must be at least 1 (room for <bos>), got {text_len}")
        self._tok = tokenizer
        self.text_len = text_len
        """Ids per encoded caption, ``<bos>`` included."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, captions: Iterable[str], cfg: TextConfig) -> TextTokenizer:
        """Train a BPE of at most ``cfg.vocab_size`` tokens (specials included) on ``captions``.

        Logs a warning if the longest training caption does not fit in ``cfg.text_len`` ids.
        """
        captions = list(captions)
        if not captions:
            raise UserError("cannot train a text tokenizer on an empty list of captions")
        if cfg.vocab_size <= len(SPECIAL_TOKENS):
            raise UserError(f"text vocabulary of {cfg.vocab_size} leaves no room beside the special tokens")
        tok = _blank_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
        tok.train_from_iterator(captions, trainer=trainer)
        if tok.get_vocab_size() > cfg.vocab_size:  # alphabet alone larger than the budget
            raise UserError(
                f"the captions use {tok.get_vocab_size()} distinct symbols, more than the text "
                f"vocabulary of {cfg.vocab_size}"
            )
        out = cls(tok, text_len=cfg.text_len)
        longest = max(len(ids) for ids in out._token_ids(captions)) + 1
        if longest > cfg.text_len:
            logger.warning(
                "the longest training caption is %d tokens with <bos>, more than text_len=%d; "
                "such captions will be truncated",
                longest,
                cfg.text_len,
            )
        return out

    @classmethod
    def train_on_shapes(cls, cfg: TextConfig) -> TextTokenizer:
        """Train on every caption of the built-in ``shapes`` data set (all splits)."""
        from dalle_together.data.shapes import all_attributes

        return cls.train(sorted({a.caption for a in all_attributes("all")}), cfg)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<directory>/text_tokenizer.json`` atomically; returns its path."""
        path = Path(directory) / TEXT_TOKENIZER_FILE
        write_json_atomic(
            path,
            {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "text_len": self.text_len,
                "tokenizer": json.loads(self._tok.to_str()),
            },
        )
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TextTokenizer:
        """Read ``<directory>/text_tokenizer.json``; a missing or corrupt file is a :class:`UserError`."""
        path = Path(directory) / TEXT_TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no text tokenizer at {path} (train one first)")
        try:
            blob: dict[str, Any] = json.loads(path.read_text())
            if blob.get("format") != _FORMAT:
                raise ValueError("not a dalle-together text tokenizer")
            if blob.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unsupported version {blob.get('version')!r}")
            tok = Tokenizer.from_str(json.dumps(blob["tokenizer"]))
            text_len = int(blob["text_len"])
        except Exception as e:  # JSON, key, or tokenizers errors all mean the same to the user
            raise UserError(f"text tokenizer file {path} is corrupt or unreadable ({e})") from e
        return cls(tok, text_len=text_len)

    # ------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (specials included); at most the ``TextConfig.vocab_size`` it was trained with."""
        return self._tok.get_vocab_size()

    def _token_ids(self, captions: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(captions), add_special_tokens=False)]

    def _frame(self, ids: list[int]) -> tuple[list[int], bool]:
        ids = [BOS_ID, *ids]
        truncated = len(ids) > self.text_len
        ids = ids[: self.text_len]
        return ids + [PAD_ID] * (self.text_len - len(ids)), truncated

    def encode(self, caption: str) -> list[int]:
        """``[<bos>, tokens...]`` padded with ``<pad>`` to ``text_len``; too long is truncated (with a warning)."""
        ids, truncated = self._frame(self._token_ids([caption])[0])
        if truncated:
            logger.warning("caption truncated to %d tokens: %r", self.text_len, caption)
        return ids

    def encode_batch(self, captions: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Encode many captions: ids ``(B, text_len)`` (int64) and whether each was truncated.

        Truncations are also logged as warnings, one per caption.
        """
        rows, flags = [], []
        for caption, ids in zip(captions, self._token_ids(captions), strict=True):
            framed, truncated = self._frame(ids)
            if truncated:
                logger.warning("caption truncated to %d tokens: %r", self.text_len, caption)
            rows.append(framed)
            flags.append(truncated)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.text_len), flags

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The caption of one id sequence; ``<pad>``, ``<bos>`` and ``<unk>`` are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each row of ``(B, T)`` ids."""
        return [self.decode(row) for row in ids]

    def num_tokens(self, caption: str) -> int:
        """Ids the caption needs, ``<bos>`` included and before padding or truncation."""
        return len(self._token_ids([caption])[0]) + 1

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, text_len={self.text_len})"
