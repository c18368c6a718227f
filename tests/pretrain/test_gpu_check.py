"""bench/gpu_check.sh without a GPU fails at once with a message; its MFU arithmetic is right."""

import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fails_clearly_without_cuda(tmp_path):
    start = time.time()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=os.path.join(ROOT, ".venv/bin/python"),
                                   GPU_CHECK_OUT=str(tmp_path / "out.json")))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was measured" in proc.stderr
    assert not (tmp_path / "out.json").exists()
    assert time.time() - start < 60


def test_python_entry_refuses_without_cuda(capsys):
    import pytest

    from bench.gpu_check import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", "/nonexistent/x.json"])
    assert exit_.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_mfu_and_peak_table():
    from bench.gpu_check import mfu, peak_flops

    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Unknown GPU") is None and mfu(10, 1.0, None) is None
    # 1.7e9 params at 40k tokens/s on 989 TFLOP/s: 6 * 1.7e9 * 4e4 / 9.89e14
    assert abs(mfu(1_700_000_000, 40_000.0, 989e12) - 0.41254) < 1e-4
