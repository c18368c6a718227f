"""The demo (`make demo`) end to end, at a smaller size: corpus, tokenizer, preprocessing, TP=2
pruning-aware training on 2 gloo processes, stop mid-pruning, resume from the checkpoint, report
and plots."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_ITERS="60", DEMO_STOP_AT="50",
               DEMO_VOCAB="2000", PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "TP 2 x PP 1 x DP 1" in out
    assert "stopped at iteration 50" in out
    assert "loaded checkpoint" in out and "(iteration 50)" in out
    assert "loss went down: yes" in out
    assert "pruning at iteration" in out and "found architecture" in out
    assert "continuing on the shrunk model" in out and "speed-up" in out
    assert "LlamaForCausalLM" in out and "generated: 'Return the number of" in out
    for png in ("saliency.png", "kept_ratio.png", "layers.png"):
        assert (tmp_path / "demo" / "tensorboard" / "plots" / png).stat().st_size > 1000
    assert (tmp_path / "demo" / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "60"
    events = [n for n in os.listdir(tmp_path / "demo" / "tensorboard") if n.startswith("events.out")]
    assert events, "tensorboard event files expected"
