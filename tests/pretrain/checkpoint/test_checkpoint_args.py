"""`--load` adopts the checkpoint's model shape and tokenizer (issue 20): shape flags may be left
out, given ones must agree; `--tokenizer-model` takes a HF folder or tokenizer.json wherever it takes
a sentencepiece model; data whose manifest names another tokenizer is refused. In-process checks of
the argument parsing (the checkpoint is a trainer state handed to `config_from_args`)."""

import dataclasses
import json

import pytest

from pretrain.run import arguments
from pretrain.config import MODEL_PRESETS, ConfigError, DataConfig, ModelConfig, PretrainConfig

SAVED = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=384, seq_length=128, rotary_base=100000.0, vocab_size=1000)


def _state(model=SAVED, data=DataConfig(), **extra) -> dict:
    return {"config": PretrainConfig(model=model, data=data).to_dict(), **extra}


def _config(monkeypatch, argv, state=None):
    monkeypatch.setattr(arguments, "peek_checkpoint", lambda load: None if state is None else ("ckpt/iter_0", state))
    args = arguments.build_parser().parse_args(["--mock-data", "--train-iters", "2", *argv])
    return arguments.config_from_args(args)


def test_load_alone_adopts_the_checkpoint_shape(monkeypatch):
    cfg = _config(monkeypatch, ["--load", "ckpt"], _state())
    assert cfg.model == SAVED
    # run settings that no weight depends on stay the command's; agreeing shape flags are accepted
    cfg = _config(monkeypatch, ["--load", "ckpt", "--seq-length", "32", "--num-layers", "4",
                                "--num-query-groups", "2", "--kv-channels", "32"], _state())
    assert cfg.model == dataclasses.replace(SAVED, seq_length=32)


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "3"], "--num-layers says num-layers 3, but the checkpoint ckpt/iter_0 (--load) has num-layers 4"),
    (["--num-query-groups", "4"], "--num-query-groups says num-query-groups 4, but the checkpoint ckpt/iter_0 (--load) "
                                  "has num-query-groups 2"),
    (["--untie-embeddings-and-output-weights"], "untie-embeddings-and-output-weights True, but"),
    (["--model", "smollm-135m"], "--model smollm-135m says num-layers 30, but the checkpoint"),
])
def test_shape_flags_that_contradict_the_checkpoint_are_refused(monkeypatch, argv, message):
    with pytest.raises(ConfigError) as err:
        _config(monkeypatch, ["--load", "ckpt", *argv], _state())
    assert message in str(err.value)


def test_a_preset_that_agrees_keeps_the_checkpoints_other_values(monkeypatch):
    imported = ModelConfig(**{**MODEL_PRESETS["smollm-135m"], "rotary_base": 100000.0, "kv_channels": 64})
    cfg = _config(monkeypatch, ["--model", "smollm-135m", "--load", "ckpt"], _state(imported))
    assert cfg.model.rotary_base == 100000.0  # the checkpoint's (SmolLM2), not the preset's (SmolLM)


def test_shrunk_checkpoints_and_use_checkpoint_args_take_the_checkpoint_shape(monkeypatch):
    # the flags of the run that shrank describe the parent; --use-checkpoint-args overrides them
    cfg = _config(monkeypatch, ["--load", "ckpt", "--num-layers", "8"], _state(shrink_history=[{"iteration": 3}]))
    assert cfg.model.num_layers == 4
    cfg = _config(monkeypatch, ["--load", "ckpt", "--num-layers", "8", "--use-checkpoint-args"], _state())
    assert cfg.model.num_layers == 4


def test_no_checkpoint_yet_needs_the_shape(monkeypatch):
    with pytest.raises(ConfigError, match="shape is incomplete.*--load ckpt holds no checkpoint"):
        _config(monkeypatch, ["--load", "ckpt"], None)
    assert _config(monkeypatch, ["--model", "debug", "--load", "ckpt"], None).model.num_layers == 4


def _hf_tokenizer(folder, words=("a", "b", "</s>")) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(("<unk>", *words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_the_checkpoints_tokenizer_is_adopted_unless_one_is_given(monkeypatch, tmp_path):
    recorded = _hf_tokenizer(tmp_path / "ckpt" / "tokenizer")
    state = _state(data=DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=recorded))
    monkeypatch.setattr(arguments, "peek_checkpoint", lambda load: ("ckpt/iter_0", state))
    args = arguments.build_parser().parse_args(["--load", "ckpt", "--train-iters", "2", "--data-path", "x"])
    data = arguments.config_from_args(args).data
    assert (data.tokenizer_type, data.tokenizer_model) == ("HuggingFaceTokenizer", recorded)
    other = _hf_tokenizer(tmp_path / "other")
    args = arguments.build_parser().parse_args(["--load", "ckpt", "--train-iters", "2", "--tokenizer-model",
                                                f"{other}/tokenizer.json"])
    data = arguments.config_from_args(args).data
    assert (data.tokenizer_type, data.tokenizer_model) == ("HuggingFaceTokenizer", f"{other}/tokenizer.json")


def test_a_moved_checkpoint_finds_its_tokenizer_beside_it(tmp_path):
    from pretrain.checkpoint.tokenizer import checkpoint_tokenizer

    moved = _hf_tokenizer(tmp_path / "moved" / "tokenizer")
    state = _state(data=DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/gone/ckpt/tokenizer"))
    assert checkpoint_tokenizer(str(tmp_path / "moved" / "iter_0000000"), state) == ("HuggingFaceTokenizer", moved)


def test_sentencepiece_types_read_a_hf_folder_or_tokenizer_json(tmp_path):
    from data_prep.tokenizers import HuggingFaceTokenizer, build_tokenizer

    folder = _hf_tokenizer(tmp_path / "hf")
    for path in (folder, f"{folder}/tokenizer.json"):
        tok = build_tokenizer("GPTSentencePieceTokenizer", path)
        assert isinstance(tok, HuggingFaceTokenizer) and tok.tokenize("a b") == [1, 2] and tok.eod == 3


def test_data_made_with_another_tokenizer_is_refused(tiny_dataset, tmp_path):
    from data_prep.tokenizers import build_tokenizer
    from pretrain.data import check_datasets

    data = DataConfig(data_path=[tiny_dataset["prefix"]])
    check_datasets(data, build_tokenizer("GPTSentencePieceTokenizer", tiny_dataset["tokenizer"]))  # its own: fine
    small = build_tokenizer("HuggingFaceTokenizer", _hf_tokenizer(tmp_path / "small"))
    with pytest.raises(ConfigError, match=r"made with 1000 tokens .*not with the tokenizer .*tokenizer.json \(4 tokens\)"):
        check_datasets(data, small)
    # same vocabulary size, another file: the manifest's sha256 tells them apart
    words = tuple(f"w{i}" for i in range(998)) + ("</s>",)
    same_size = build_tokenizer("HuggingFaceTokenizer", _hf_tokenizer(tmp_path / "same_size", words))
    assert same_size.vocab_size == 1000
    with pytest.raises(ConfigError, match=r"made with another tokenizer file \(sha256"):
        check_datasets(data, same_size)
    assert json.load(open(tiny_dataset["prefix"] + ".json"))["vocab_size"] == 1000


def test_one_tokenizer_identity_rule_for_checkpoints(tmp_path):
    """Issue 31 item 5: a checkpoint's tokenizer (recorded identity, or for a checkpoint from before
    that, the file its config names) against the one a command gives, by the rule the data manifests
    use: another tokenizer of the same vocabulary size is refused, with the one message."""
    from data_prep.tokenizers import build_tokenizer
    from pretrain.resume import check_checkpoint_tokenizer, tokenizer_record

    words = ("a", "b", "</s>")
    ours = build_tokenizer("HuggingFaceTokenizer", _hf_tokenizer(tmp_path / "ours", words))
    other = build_tokenizer("HuggingFaceTokenizer", _hf_tokenizer(tmp_path / "other", ("x", "y", "</s>")))
    assert other.vocab_size == ours.vocab_size
    recorded = _state(**tokenizer_record(ours))
    old = _state(data=DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "ours")))
    for state in (recorded, old):
        check_checkpoint_tokenizer("--load", "ckpt/iter_0", state, ours)  # its own: fine
        with pytest.raises(ConfigError, match=r"--load ckpt/iter_0: the checkpoint was trained with another tokenizer "
                                              r"file \(sha256 .*\), not with the tokenizer .*other/tokenizer\.json \(4 "
                                              r"tokens\): its token ids would mean other tokens"):
            check_checkpoint_tokenizer("--load", "ckpt/iter_0", state, other)
    check_checkpoint_tokenizer("--load", "ckpt/iter_0", _state(), other)  # nothing recorded: nothing to compare
    # an import records the other form of its tokenizer (a tokenizer.model beside the tokenizer.json)
    check_checkpoint_tokenizer("--load", "ckpt/iter_0", _state(**tokenizer_record(other, also=(ours.path,))), ours)
