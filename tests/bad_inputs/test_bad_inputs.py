"""Walk the bad-input corpus: every case must fail with its message, no traceback, nothing left."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
from pathlib import Path

import pytest

from tests.bad_inputs.harness import ROOT, BadInput, Fixtures
from tests.dist_helper import subprocess_env


def _all_cases() -> list[BadInput]:
    cases = []
    package = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(package)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"tests.bad_inputs.{info.name}").CASES)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), f"duplicate case names: {names}"
    return cases


CASES = _all_cases()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly(case: BadInput, bad_input_fixtures: Fixtures, tmp_path: Path):
    argv = case.build(tmp_path, bad_input_fixtures)
    done = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=case.timeout)
    output = done.stdout + done.stderr
    shown = f"$ {' '.join(map(str, argv))}\nrc={done.returncode}\n{output[-4000:]}"
    assert done.returncode != 0, f"{case.name}: exit code 0 where an error was due\n{shown}"
    assert "Traceback (most recent call last)" not in output, f"{case.name}: traceback\n{shown}"
    assert re.search(case.message, output), f"{case.name}: message /{case.message}/ missing\n{shown}"
    for rel in case.leftovers:
        assert not (tmp_path / rel).exists(), f"{case.name}: {rel} left behind\n{shown}"
