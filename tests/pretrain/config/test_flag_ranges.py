"""Every numeric flag has a range, and a value outside it is refused (issue 31 item 13): no flag is
taken silently (a negative minimum, a NaN epsilon, 0 read as "not given"). Walks every int/float
field of every config section; adding one without a range fails here."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from pretrain.run import arguments
from pretrain.run.arguments import flag_name, flagged_fields
from pretrain.config import ConfigError, DataConfig, ModelConfig, MODEL_PRESETS, PretrainConfig, TrainConfig, \
    whole_number


def _numeric_fields() -> list[tuple[str, dataclasses.Field, object, type]]:
    out = []
    for section, cls in arguments._sections():
        hints = typing.get_type_hints(cls)
        for f, spec in flagged_fields(cls):
            base = arguments._without_none(hints[f.name])
            if base in (int, float):
                out.append((section, f, spec, base))
    return out


FIELDS = _numeric_fields()


def _valid() -> PretrainConfig:
    return PretrainConfig(model=ModelConfig(**MODEL_PRESETS["debug"]), data=DataConfig(mock_data=True),
                          train=TrainConfig(train_iters=4, global_batch_size=2, micro_batch_size=1))


def _outside(spec, kind: type) -> list[float]:
    """Values just outside the flag's range, and NaN/inf for a float (an int flag cannot parse them)."""
    values = [math.nan, math.inf] if kind is float else []
    if spec.at_least is not None:
        values.append(spec.at_least - 1)
    if spec.above is not None:
        values.append(spec.above)
    if spec.at_most is not None:
        values.append(spec.at_most + 1)
    if spec.below is not None:
        values.append(spec.below)
    return [kind(v) if math.isfinite(v) else v for v in values]


def test_there_are_numeric_flags_to_walk():
    assert len(FIELDS) > 50, [flag_name(f, s) for _, f, s, _ in FIELDS]


@pytest.mark.parametrize("section,field,spec,kind", FIELDS, ids=[flag_name(f, s) for _, f, s, _ in FIELDS])
def test_every_numeric_flag_has_a_range_that_validate_enforces(section, field, spec, kind):
    name = flag_name(field, spec)
    assert any(b is not None for b in (spec.at_least, spec.above, spec.at_most, spec.below)), \
        f"{name}: declare its range in flag(...) (at_least/above/at_most/below)"
    _valid().validate(1)  # the base is valid
    for value in _outside(spec, kind):
        cfg = _valid()
        owner = getattr(cfg, section)
        setattr(owner, field.name, value)
        if section == "prune" and field.name not in ("target_params", "target_ratio"):
            cfg.prune.target_ratio = 0.5  # a pruning flag is checked with pruning on, too
        with pytest.raises(ConfigError, match=rf"{name}\b"):
            cfg.validate(1)


def test_scientific_whole_numbers_refuse_fractions_and_infinity():
    import argparse

    assert whole_number("4e8") == 400_000_000
    for text in ("1.5", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            whole_number(text)


def test_pruning_window_and_shrink_points_past_the_end_are_warned_about(tiny_dataset, monkeypatch, capsys):
    """A window or a shrink past this run's last token is kept (a resumed, longer run reaches it)
    but never silent: the plan says what this run will and will not do."""
    from pretrain.run.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    code = main(["--model", "debug", "--seq-length", "32", "--train-iters", "10", "--micro-batch-size", "2",
                 "--global-batch-size", "2", "--dry-run", "--data-path", tiny_dataset["prefix"],
                 "--tokenizer-model", tiny_dataset["tokenizer"], "--prune-target-ratio", "0.5",
                 "--prune-end-tokens", "1000", "--save", "unused", "--shrink-at", "500,700"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("WARNING: --prune-end-tokens 1,000 is past this run's last token (640): it stops 64% of the way "
            "through the pruning window, above the target") in out, out
    assert "WARNING: --shrink-at 700: past this run's last token (640)" in out, out
    assert "--shrink-at 500" not in out


def test_a_comparison_job_whose_run_failed_exits_non_zero(monkeypatch, tmp_path, capsys):
    """tools/compare_baselines.py --only RUN:SEED is one Slurm job: a failed run is a failed job."""
    from pretrain.compare import campaign
    from pretrain.compare.recipes import get_recipe
    from tools import compare_baselines

    monkeypatch.setattr(compare_baselines, "_validate", lambda args: (get_recipe("cpu-tiny"), ["parent"], [], 0, None))
    monkeypatch.setattr(campaign.Campaign, "load_results", lambda self: None)
    monkeypatch.setattr(campaign.Campaign, "run_if_possible",
                        lambda self, run, seed, **kw: {"status": "failed", "reason": "exit code 1; see log.txt"})
    argv = ["--recipe", "cpu-tiny", "--data-path", "d", "--tokenizer-model", "t", "--test-data-path", "x",
            "--out", str(tmp_path / "cmp"), "--only", "parent:0"]
    assert compare_baselines.main(argv) == 1
    assert "error: --only parent:0: exit code 1; see log.txt" in capsys.readouterr().err
