"""Build llama.cpp here, once, from the ``llama-cpp-python`` sdist, and cache it (opt-in set-up).

    python tools/build_llama_cpp.py          # or: make llama-cpp

The prebuilt llama.cpp wheels need GLIBC 2.38 (these machines have 2.36); the sdist carries
llama.cpp's sources, which build with the cmake and gcc here. Only the shared libraries are
compiled (no tools, no server, no common library), and the sdist's pure-Python ctypes bindings
are kept beside them, so nothing is installed into the virtual environment. The cache lives in
``~/.cache/efficientllm/llama-cpp-python-<version>/`` (``$EFFICIENTLLM_CACHE`` moves the root);
a second call finds it and returns at once. The GGUF tests and ``bench/gguf_speed.py`` call
:func:`ensure_llama_cpp`, so the first of them pays the build (minutes) and later ones do not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import ModuleType

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# ``llama_cpp/llama_cache.py`` imports it at package import; pure Python.
DISKCACHE_VERSION = "5.6.3"
# No -march=native: the cache may be shared by machines with other CPUs (the speed table says so).
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
              "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF",
              # the libraries find each other next to themselves once moved out of the build tree
              "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"]


class LlamaCppBuildError(RuntimeError):
    """The download or the build failed; the message says which step and how to retry."""


def cache_root() -> Path:
    return Path(os.environ.get("EFFICIENTLLM_CACHE", Path.home() / ".cache" / "efficientllm"))


def llama_cpp_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The cached build of this version: ``lib/`` (libllama.so, libggml*.so), ``python/``
    (the ``llama_cpp`` bindings and diskcache) and ``BUILD_SECONDS``."""
    return cache_root() / f"llama-cpp-python-{version}"


def _run(cmd: list[str], cwd: Path, step: str, log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise LlamaCppBuildError(f"building llama.cpp failed at {step} (exit {done.returncode}); "
                                 f"log {log}:\n" + "\n".join(tail))


def _build(target: Path, jobs: int) -> float:
    work = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    started = time.monotonic()
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work)]
    _run(pip + ["--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], work,
         "pip download of the llama-cpp-python sdist", log)
    _run(pip + ["--only-binary", ":all:", f"diskcache=={DISKCACHE_VERSION}"], work,
         "pip download of diskcache", log)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = work / sdist.name[:-len(".tar.gz")]
    vendor = src / "vendor" / "llama.cpp"
    build = work / "build"
    _run(["cmake", "-S", str(vendor), "-B", str(build), *CMAKE_ARGS], work, "cmake configure", log)
    # nice: the machine is shared; the build must not starve the others' runs.
    _run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)],
         work, "cmake build", log)
    lib = work / "lib"
    lib.mkdir()
    for so in (build / "bin").glob("*.so*"):
        shutil.copy2(so, lib / so.name, follow_symlinks=True)
    python = work / "python"
    shutil.copytree(src / "llama_cpp", python / "llama_cpp")
    with zipfile.ZipFile(next(work.glob("diskcache-*.whl"))) as whl:
        whl.extractall(python)
    shutil.copy2(vendor / "LICENSE", work / "LICENSE")
    seconds = time.monotonic() - started
    (work / "BUILD_SECONDS").write_text(f"{seconds:.0f}\n")
    for leftover in (src, build, sdist, *work.glob("diskcache-*.whl")):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    os.replace(work, target)
    return seconds


def ensure_llama_cpp(jobs: int = 2, quiet: bool = False) -> Path:
    """The cached build, built first if it is not there (one builder at a time: a file lock)."""
    target = llama_cpp_dir()
    if (target / "BUILD_SECONDS").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "BUILD_SECONDS").exists():
            if not quiet:
                print(f"building llama.cpp {LLAMA_CPP_PYTHON_VERSION} into {target} "
                      f"(once; minutes)", file=sys.stderr, flush=True)
            shutil.rmtree(target, ignore_errors=True)
            _build(target, jobs)
    return target


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` bindings of the cached build (built first if needed)."""
    root = ensure_llama_cpp()
    # read by llama_cpp/llama_cpp.py when it loads the library
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "lib")
    if str(root / "python") not in sys.path:
        sys.path.insert(0, str(root / "python"))
    import llama_cpp  # lazy: only on the path once the cache exists

    return llama_cpp


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = p.parse_args(argv)
    try:
        root = ensure_llama_cpp(args.jobs)
    except LlamaCppBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} ready in {root} "
          f"(built in {(root / 'BUILD_SECONDS').read_text().strip()} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
