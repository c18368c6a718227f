"""The megatron-core versions this code supports, checked at start.

One range, here; ``pyproject.toml`` states the same range and ``requirements.txt`` pins a version
inside it (tests/megatron_patches/test_versions.py checks that the three agree). 0.16.x is the
version tested on CPU (Python 3.11); 0.17-0.19 ship for Python 3.12 only: the code keeps to their
public API where one exists, and every private name it still uses is listed in
``megatron_patches/private_api.py``, which ``bench/gpu_check.sh`` reports on first.
"""

from __future__ import annotations

import os

SUPPORTED_MEGATRON_CORE = ">=0.16.1,<0.20"
# set to 1 to try an unsupported version anyway (a first run on a new release)
ALLOW_ENV = "EFFICIENTLLM_ALLOW_ANY_MEGATRON_CORE"


class UnsupportedVersionError(RuntimeError):
    pass


def installed_megatron_core_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def check_megatron_core_version(version: str | None = None) -> str:
    """Raise ``UnsupportedVersionError`` with what to do, unless ``version`` (default: the
    installed one) is in ``SUPPORTED_MEGATRON_CORE``. Returns the version."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = version if version is not None else installed_megatron_core_version()
    if version is None:
        raise UnsupportedVersionError(
            f"megatron-core is not installed: pip install 'megatron-core{SUPPORTED_MEGATRON_CORE}' "
            "(requirements.txt pins the tested version)")
    try:
        supported = Version(version) in SpecifierSet(SUPPORTED_MEGATRON_CORE, prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported and os.environ.get(ALLOW_ENV) != "1":
        raise UnsupportedVersionError(
            f"megatron-core {version} is not a supported version ({SUPPORTED_MEGATRON_CORE}): install one "
            f"that is (requirements.txt pins the tested one), or set {ALLOW_ENV}=1 to try it anyway; "
            "`python -m megatron_patches.private_api` then lists the internal names that moved")
    return version
