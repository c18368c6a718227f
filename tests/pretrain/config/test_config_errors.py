"""Each bad configuration gives one clear error naming the flag, before anything is built."""

import pytest

from pretrain.run.cli import main

BASE = ["--model", "debug", "--train-iters", "2", "--mock-data"]


@pytest.mark.parametrize("flags, world, message", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--num-query-groups", "6",
      "--tensor-model-parallel-size", "4"], 4, "--num-attention-heads (6) must be divisible by --tensor-model-parallel-size (4)"),
    (["--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2, "--num-query-groups (1) must be divisible"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "--num-layers (3) must be divisible by --pipeline-model-parallel-size (2)"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size (6) must be divisible by --micro-batch-size (4)"),
    (["--global-batch-size", "4", "--micro-batch-size", "1"], 8, "x data-parallel size (8)"),
    (["--tensor-model-parallel-size", "3"], 2, "world size 2 is not divisible"),
    (["--num-attention-heads", "4", "--num-query-groups", "3"], 1, "must be a multiple of --num-query-groups (3)"),
    (["--lr", "0"], 1, "--lr must be positive"),
    (["--train-tokens", "100"], 1, "exactly one of --train-iters and --train-tokens"),
    (["--use-rope-scaling", "--rope-scaling-factor", "0.5"], 1, "--rope-scaling-factor 0.5 must be >= 1"),
    (["--num-dataset-builder-threads", "0"], 1, "--num-dataset-builder-threads 0: must be at least 1"),
])
def test_bad_config_messages(flags, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    assert main(BASE + flags) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_missing_data_path_and_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--model", "debug", "--train-iters", "2"]) == 2
    assert "--data-path is required" in capsys.readouterr().err
    assert main(["--model", "debug", "--train-iters", "2", "--data-path", str(tmp_path / "nope")]) == 2
    assert "nope.bin does not exist" in capsys.readouterr().err


def test_tokenizer_vocab_larger_than_model(tiny_dataset, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["--model", "debug", "--train-iters", "2", "--data-path", tiny_dataset["prefix"],
                 "--tokenizer-model", tiny_dataset["tokenizer"], "--vocab-size", "500"])
    assert code == 2
    assert "smaller than the tokenizer's vocabulary (1000)" in capsys.readouterr().err


def test_incomplete_model_shape(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--num-layers", "2", "--train-iters", "2", "--mock-data"]) == 2
    assert "give --model PRESET or --hidden-size" in capsys.readouterr().err


def test_dry_run_prints_plan(tiny_dataset, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    code = main(["--model", "smollm-135m", "--train-iters", "10", "--dry-run", "--data-path",
                 tiny_dataset["prefix"], "--tokenizer-model", tiny_dataset["tokenizer"]])
    assert code == 0
    out = capsys.readouterr().out
    assert "30 layers, hidden 576, heads 9 (query groups 3" in out
    assert "parameters: 134.52 M total" in out  # SmolLM-135M: 134.5M with tied embeddings
    assert "TP 1 x PP 1 x DP 1" in out


def test_layer_shapes_file_is_read_and_bad_ones_are_usage_errors(tmp_path, capsys):
    import json

    from pretrain.run.arguments import build_parser, config_from_args

    shapes = [{"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 384},
              {"num_query_groups": 1, "num_attention_heads": 2, "ffn_hidden_size": 64}]
    good = tmp_path / "shapes.json"
    good.write_text(json.dumps(shapes))
    base = ["--model", "debug", "--num-layers", "2", "--mock-data", "--train-iters", "1"]
    cfg = config_from_args(build_parser().parse_args(base + ["--layer-shapes", str(good)]))
    assert cfg.model.layer_shapes == shapes and cfg.model.layer_widths() == [(2, 4, 384), (1, 2, 64)]
    for text, message in (("[1, 2", "line 1: not JSON"), ('[{"num_query_groups": 2}]', "one object per layer")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + ["--layer-shapes", str(bad)])
        err = capsys.readouterr().err
        assert "--layer-shapes" in err and str(bad) in err and message in err, err


def test_layer_shapes_wider_than_the_global_flags_are_refused(tmp_path):
    """Issue 31 item 6: the global flags give the widest layer (parameter count, export, rebuilds)."""
    import json

    from pretrain.run.arguments import build_parser, config_from_args
    from pretrain.config import ConfigError

    base = ["--model", "debug", "--num-layers", "2", "--mock-data", "--train-iters", "1"]
    for i, key, flag_name, value in ((1, "ffn_hidden_size", "--ffn-hidden-size", 512),
                                     (0, "num_query_groups", "--num-query-groups", 4)):
        shapes = [{"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 384} for _ in range(2)]
        shapes[i][key] = value
        if key == "num_query_groups":
            shapes[i]["num_attention_heads"] = 2 * value  # consistent heads per group
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(shapes))
        args = build_parser().parse_args(base + ["--layer-shapes", str(path)])
        with pytest.raises(ConfigError, match=rf"--layer-shapes: layer {i} has {key} {value}, more than {flag_name}"):
            config_from_args(args).validate(1)
