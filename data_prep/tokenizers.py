"""Tokenizers shared by `tools/preprocess_data.py` and the trainer.

Names follow Megatron-LM's ``--tokenizer-type`` values:

* ``GPTSentencePieceTokenizer``: a sentencepiece model used as is; end-of-document is the
  model's ``</s>`` (eos) id.
* ``SentencePieceTokenizer``: the same model. Megatron-LM's version of this type appends extra
  special tokens (``<CLS>``, ``<EOD>``, ...) after the vocabulary when the model lacks them; we do
  not add ids: the end-of-document token is ``</s>`` here too, so the vocabulary size is exactly
  the model's. Models from ``data_prep.train_tokenizer`` have ``</s>`` = 2.
* ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or a folder holding one) read with the
  ``tokenizers`` library (no ``transformers`` and no download); eod is the first of
  ``</s>``, ``<|endoftext|>``, ``<eos>``, ``<|end_of_text|>`` present, or ``--eod-id``.
* ``NullTokenizer``: the text is whitespace-separated integer ids; ``--vocab-size`` is required and
  the eod id is ``vocab_size - 1`` (Megatron-LM's convention).

All of them offer ``tokenize_batch`` so that preprocessing encodes many documents per call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

TOKENIZER_TYPES = (
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded from what the user gave; the message says what to do."""


class TextTokenizer:
    """The interface every tokenizer here provides."""

    name: str
    vocab_size: int
    eod: int
    bos: int | None = None
    pad: int | None = None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> dict:
        """What identifies this tokenizer for dataset cache hashes."""
        return {"class": self.name, "path": getattr(self, "path", None), "vocab": self.vocab_size}


class SentencePieceTokenizer(TextTokenizer):
    def __init__(self, model_path: str, name: str = "GPTSentencePieceTokenizer"):
        import sentencepiece as spm

        if not model_path:
            raise TokenizerError(f"--tokenizer-model is required for --tokenizer-type {name}")
        if not os.path.isfile(model_path):
            raise TokenizerError(f"--tokenizer-model {model_path!r}: no such file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(
                f"--tokenizer-model {model_path!r} is not a readable sentencepiece model ({err})"
            ) from None
        self.name = name
        self.path = os.path.abspath(model_path)
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        if eos < 0:
            raise TokenizerError(
                f"--tokenizer-model {model_path!r} has no </s> (eos) piece to use as end-of-document"
            )
        self.eod = eos
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.unk = self._sp.unk_id()

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # One call for the whole batch: sentencepiece encodes it in C++. One thread by default, so
        # that N preprocessing workers use N cores.
        return self._sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HuggingFaceTokenizer(TextTokenizer):
    _EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")

    def __init__(self, path: str, eod_id: int | None = None):
        from tokenizers import Tokenizer

        if not path:
            raise TokenizerError("--tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer")
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"--tokenizer-model {path!r}: no tokenizer.json there")
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"--tokenizer-model {file!r} is not a readable tokenizer.json ({err})") from None
        self.name = "HuggingFaceTokenizer"
        self.path = os.path.abspath(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eod_id is None:
            for token in self._EOD_CANDIDATES:
                eod_id = self._tok.token_to_id(token)
                if eod_id is not None:
                    break
        if eod_id is None:
            raise TokenizerError(f"{file}: no end-of-document token found; pass --eod-id")
        self.eod = int(eod_id)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(TextTokenizer):
    def __init__(self, vocab_size: int | None):
        if not vocab_size or vocab_size < 2:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size (>= 2)")
        self.name = "NullTokenizer"
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            try:
                ids = [int(t) for t in text.split()]
            except ValueError:
                raise ValueError("NullTokenizer expects whitespace-separated integers") from None
            if any(i < 0 or i >= self.vocab_size for i in ids):
                raise ValueError(f"NullTokenizer: an id is outside [0, {self.vocab_size})")
            out.append(ids)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


_SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")


def is_hf_tokenizer_path(path: str | None) -> bool:
    """A HuggingFace tokenizer: a folder holding ``tokenizer.json``, or a ``.json`` file."""
    if not path:
        return False
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "tokenizer.json"))
    return path.endswith(".json")


def infer_tokenizer_type(tokenizer_model: str | None) -> str:
    """The --tokenizer-type a --tokenizer-model path implies when no type is given."""
    return "HuggingFaceTokenizer" if is_hf_tokenizer_path(tokenizer_model) else "GPTSentencePieceTokenizer"


def _sentencepiece_file(path: str | None) -> str | None:
    """A folder holding a Llama-2-style ``tokenizer.model`` stands for that file."""
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
        return os.path.join(path, "tokenizer.model")
    return path


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    eod_id: int | None = None,
) -> TextTokenizer:
    """Build a tokenizer by Megatron-LM type name; raises TokenizerError with a clear message.

    A sentencepiece type given a HuggingFace tokenizer (folder or ``tokenizer.json``) reads it as
    ``HuggingFaceTokenizer``: the path says what it is, and one flag then works for both kinds."""
    if tokenizer_type in _SENTENCEPIECE_TYPES and is_hf_tokenizer_path(tokenizer_model):
        tokenizer_type = "HuggingFaceTokenizer"
    if tokenizer_type in _SENTENCEPIECE_TYPES:
        tok: TextTokenizer = SentencePieceTokenizer(_sentencepiece_file(tokenizer_model), name=tokenizer_type)
    elif tokenizer_type == "HuggingFaceTokenizer":
        tok = HuggingFaceTokenizer(tokenizer_model, eod_id=eod_id)
    elif tokenizer_type == "NullTokenizer":
        tok = NullTokenizer(vocab_size)
    else:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
            + ", ".join(TOKENIZER_TYPES)
        )
    if eod_id is not None and tokenizer_type != "HuggingFaceTokenizer":
        if not 0 <= eod_id < tok.vocab_size:
            raise TokenizerError(f"--eod-id {eod_id} is outside the vocabulary [0, {tok.vocab_size})")
        tok.eod = eod_id
    return tok
