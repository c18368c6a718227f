"""Our tokenizers as HuggingFace tokenizer folders that ``AutoTokenizer`` loads with no remote code.

A sentencepiece BPE model (``data_prep.train_tokenizer`` or a Llama-2-style ``tokenizer.model``)
becomes a ``tokenizer.json`` that encodes exactly as sentencepiece does: the dummy prefix and
spaces become ``▁`` in the normalizer; words split where a run of ``▁`` starts (sentencepiece's
whitespace split with whitespace-only pieces allowed); merges are ranked by the merged piece's
score; unknown characters fall back to bytes. transformers' own converter is not used because its
result depends on the transformers version and, for these options, differs from sentencepiece on
leading and repeated spaces. The conversion is checked on sample texts before anything is written.

A ``HuggingFaceTokenizer`` (``tokenizer.json``) is copied as it is, with its config when present.
"""

from __future__ import annotations

import json
import os
import shutil

from data_prep.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer, TextTokenizer, TokenizerError

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL = 1, 2, 3
_CHECK_TEXTS = (
    "Hello world", "  two  spaces\nnew line\ttab", " leading", "trailing ", "   ", "",
    "def f(x):\n    return x**2  # ünïcödé 漢字 🙂", "1234567 8.9e-10", "a\u3000b\u00a0c",
)


def sentencepiece_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def sentencepiece_to_tokenizers(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece BPE model at ``model_path``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = sentencepiece_proto(model_path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if spec.model_type != spec.BPE:
        unsupported.append(f"model type {spec.ModelType.Name(spec.model_type)} (only BPE)")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        unsupported.append(f"normalization rule {norm.name!r} (only identity)")
    if norm.remove_extra_whitespaces or spec.treat_whitespace_as_suffix or not spec.split_by_whitespace:
        unsupported.append("remove_extra_whitespaces / treat_whitespace_as_suffix / no split_by_whitespace")
    if unsupported:
        raise TokenizerError(f"{model_path}: cannot export this sentencepiece model to a HuggingFace "
                             f"tokenizer: {'; '.join(unsupported)}")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for i, piece in enumerate(proto.pieces):
        if piece.type != _SP_NORMAL:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], left, right))
    merges.sort()
    unk = next(p.piece for p in proto.pieces if p.type == _SP_UNKNOWN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], unk_token=unk,
                               byte_fallback=spec.byte_fallback, fuse_unk=True))
    prefix = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    word = "▁+[^▁]*|[^▁]+" if spec.allow_whitespace_only_pieces else "▁?[^▁]*"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def _check_same_encoding(ours: TextTokenizer, hf_tok, texts) -> None:
    for text in texts:
        expected, got = ours.tokenize(text), hf_tok.encode(text, add_special_tokens=False).ids
        if expected != got:
            raise TokenizerError(f"{getattr(ours, 'path', ours.name)}: the HuggingFace tokenizer built from it "
                                 f"encodes {text[:40]!r} differently ({got[:8]} vs {expected[:8]}); not exported")


def export_hf_tokenizer(tokenizer: TextTokenizer, folder: str, model_max_length: int,
                        extra_check_texts=()) -> dict:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``folder``; returns the special ids
    (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) for the model config."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        hf_tok = sentencepiece_to_tokenizers(tokenizer.path)
        _check_same_encoding(tokenizer, hf_tok, [*_CHECK_TEXTS, *extra_check_texts])
        hf_tok.save(os.path.join(folder, "tokenizer.json"))
        shutil.copyfile(tokenizer.path, os.path.join(folder, "tokenizer.model"))
        piece = tokenizer.id_to_piece
    elif isinstance(tokenizer, HuggingFaceTokenizer):
        shutil.copyfile(tokenizer.path, os.path.join(folder, "tokenizer.json"))
        source_config = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
        if os.path.isfile(source_config):  # the original settings (chat template, special tokens)
            shutil.copyfile(source_config, os.path.join(folder, "tokenizer_config.json"))
            return {"eos_token_id": tokenizer.eod}
        from tokenizers import Tokenizer

        piece = Tokenizer.from_file(tokenizer.path).id_to_token
    else:
        raise TokenizerError(f"--tokenizer-type {tokenizer.name} cannot be exported as a HuggingFace tokenizer")
    ids = {"eos_token_id": tokenizer.eod, "bos_token_id": tokenizer.bos, "pad_token_id": tokenizer.pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # our pipeline adds no BOS/EOS when encoding text (the EOD goes between documents)
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # "</s>" written in a text is text (sentencepiece never matches special pieces in text)
        "split_special_tokens": True,
        "model_max_length": model_max_length,
    }
    for key, token_id in (("eos_token", ids["eos_token_id"]), ("bos_token", ids["bos_token_id"]),
                          ("pad_token", ids["pad_token_id"]), ("unk_token", getattr(tokenizer, "unk", None))):
        if token_id is not None:
            config[key] = piece(token_id)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v for k, v in ids.items() if v is not None}
