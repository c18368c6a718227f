"""Bad pruning flags to training (`python -m pretrain --prune-...`): refused before any model is built."""

from __future__ import annotations

from tests.bad_inputs.harness import BadInput, python


def _prune(f, *extra: str) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32",
                  "--data-path", f.dataset, "--tokenizer-model", f.tokenizer, "--split", "98,2,0",
                  "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                  "--prune-target-ratio", "0.7", *extra)


CASES = [
    BadInput("pruning-max-step-fraction-zero", lambda d, f: _prune(f, "--prune-max-step-fraction", "0"),
             message=r"--prune-max-step-fraction must be in \(0, 1\]"),
    BadInput("pruning-loss-jump-warn-negative", lambda d, f: _prune(f, "--prune-loss-jump-warn", "-1"),
             message=r"--prune-loss-jump-warn must be positive"),
    BadInput("pruning-allocation-unknown", lambda d, f: _prune(f, "--prune-allocation", "greedy"),
             message=r"--prune-allocation.*invalid choice"),
    BadInput("pruning-search-not-uniform", lambda d, f: _prune(f, "--prune-allocation", "search"),
             message=r"--prune-allocation search chooses homogeneous shapes \(Minitron\): add --prune-granularity "
                     r"uniform"),
    BadInput("pruning-search-unreachable-target",
             lambda d, f: _prune(f, "--prune-allocation", "search", "--prune-granularity", "uniform",
                                 "--prune-search-hidden-divisor", "32", "--prune-search-ffn-divisor", "64",
                                 "--prune-target-ratio", "0.2"),
             message=r"--prune-allocation search: its narrowest shape has [\d,]+ parameters, above the target"),
    BadInput("pruning-compensation-unknown", lambda d, f: _prune(f, "--prune-compensation", "sparsegpt"),
             message=r"--prune-compensation.*invalid choice"),
    BadInput("pruning-compensation-window-zero", lambda d, f: _prune(f, "--prune-compensation", "obs",
                                                                       "--prune-compensation-window", "0"),
             message=r"--prune-compensation-window must be >= 1"),
    BadInput("pruning-compensation-window-past-interval",
             lambda d, f: _prune(f, "--prune-compensation", "obs", "--prune-interval", "2",
                                 "--prune-compensation-window", "3"),
             message=r"--prune-compensation-window \(3\) must not exceed --prune-interval \(2\)"),
    BadInput("pruning-compensation-probe-without-obs", lambda d, f: _prune(f, "--prune-compensation-probe"),
             message=r"--prune-compensation-probe needs --prune-compensation obs"),
    BadInput("pruning-compensation-probe-without-test-data",
             lambda d, f: _prune(f, "--prune-compensation", "obs", "--prune-compensation-probe"),
             message=r"--prune-compensation-probe needs --test-data-path"),
    BadInput("pruning-compensation-damp-negative", lambda d, f: _prune(f, "--prune-compensation-damp", "-0.1"),
             message=r"--prune-compensation-damp must be positive"),
]
