"""megatron-core versions: one supported range, stated alike in pyproject.toml and
requirements.txt, checked at start; the private names the code uses are listed and resolve."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unsupported_version_fails_with_a_message(monkeypatch):
    from megatron_patches.versions import (ALLOW_ENV, SUPPORTED_MEGATRON_CORE, UnsupportedVersionError,
                                           check_megatron_core_version)

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    for ok in ("0.16.1", "0.17.0", "0.19.2", "0.19.0rc1"):
        assert check_megatron_core_version(ok) == ok
    for bad in ("0.15.3", "0.20.0", "1.0.0", "not-a-version"):
        with pytest.raises(UnsupportedVersionError, match=re.escape(SUPPORTED_MEGATRON_CORE)) as err:
            check_megatron_core_version(bad)
        assert ALLOW_ENV in str(err.value)
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert check_megatron_core_version("0.20.0") == "0.20.0"
    monkeypatch.delenv(ALLOW_ENV)
    assert check_megatron_core_version()  # the installed one


def test_build_model_turns_it_into_a_config_error(monkeypatch):
    import megatron_patches.versions as versions
    from pretrain.config import ConfigError
    from pretrain.model.build import check_supported_megatron_core

    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    monkeypatch.setattr(versions, "installed_megatron_core_version", lambda: "0.21.0")
    with pytest.raises(ConfigError, match="megatron-core 0.21.0 is not a supported version"):
        check_supported_megatron_core()


def test_pyproject_and_requirements_agree():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from megatron_patches.versions import SUPPORTED_MEGATRON_CORE

    supported = SpecifierSet(SUPPORTED_MEGATRON_CORE)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = [Requirement(m) for m in re.findall(r'"(megatron-core[^"]*)"', f.read())]
    assert [r.specifier for r in pyproject] == [supported]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pinned = [Requirement(line.split("#")[0].strip()) for line in f if line.startswith("megatron-core")]
    assert len(pinned) == 1
    version = str(pinned[0].specifier).removeprefix("==")
    assert str(pinned[0].specifier).startswith("==") and version in supported


def test_private_names_resolve_on_the_installed_version():
    from megatron_patches.private_api import PRIVATE_NAMES, missing_names

    assert missing_names() == []
    for entry in PRIVATE_NAMES:  # the list names where each one is used: keep it true
        with open(os.path.join(ROOT, entry.used_in)) as f:
            assert entry.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1] in f.read(), entry


def test_a_moved_name_is_reported():
    code = textwrap.dedent("""
        from megatron.core.optimizer import distrib_optimizer
        del distrib_optimizer.DistributedOptimizer._get_model_param_range_map
        from megatron_patches.private_api import main
        raise SystemExit(main())
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "MISSING megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._get_model_param_range_map" \
        in proc.stdout


def _megatron_private_definitions() -> set[str]:
    import megatron.core

    root = os.path.dirname(megatron.core.__file__)
    names = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    names.update(re.findall(r"(?:def |self\.|^)(_[a-z]\w*)\s*[(=:]", f.read(), re.M))
    return names


def test_every_private_megatron_name_in_the_code_is_listed():
    """An underscored attribute our code reads that megatron-core defines (and we do not) must be
    in megatron_patches/private_api.py."""
    from megatron_patches.private_api import PRIVATE_NAMES

    listed = {e.target.rsplit(".", 1)[-1].rsplit(":", 1)[-1] for e in PRIVATE_NAMES}
    ours, used = set(), {}
    for top in ("pretrain", "megatron_patches", "tools", "data_prep", "eval", "bench"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                ours.update(re.findall(r"(?:def |class |self\.|^\s*)(_[a-z]\w*)\s*[(=:]", text, re.M))
                for attr in re.findall(r"(?<!self)(?<!cls)\.(_[a-z]\w*)\b", text):
                    used.setdefault(attr, os.path.relpath(path, ROOT))
    theirs = _megatron_private_definitions()
    unlisted = {a: p for a, p in used.items() if a in theirs and a not in ours and a not in listed}
    assert not unlisted, f"private megatron-core names used but not listed in private_api.py: {unlisted}"
