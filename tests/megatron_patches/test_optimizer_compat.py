"""The torch-Adam ``step`` fix applies wherever megatron-core runs on torch's Adam, GPU or not; the
CPU shim stays off when CUDA exists unless forced. Fresh interpreters: both change process state."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_step_fix_applies_on_a_gpu_machine_without_apex_or_te():
    out = _run("""
        import torch
        torch.cuda.is_available = lambda: True  # a GPU machine (no TE, no apex: torch Adam)
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron_patches import apply_cpu_shims
        from megatron_patches.optimizer_compat import apply_torch_adam_step_fix, torch_adam_step_fix_needed
        print(apply_cpu_shims(), torch_adam_step_fix_needed(), apply_torch_adam_step_fix(),
              apply_torch_adam_step_fix(), torch_adam_step_fix_needed())
        # the wrapper feeds the destination's own step back when the loaded tensors lack it
        seen = {}
        class Fake:
            config = type("C", (), {"use_precision_aware_optimizer_no_fp8_or_ds_fp8": False})()
            model_param_group_index_map = {"p": (0, 0)}
            main = torch.zeros(2)
            optimizer = type("O", (), {"param_groups": [{"params": [main]}],
                                       "state": {main: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(2)}}})()
        def record(self, model_param, tensors):
            seen.update(tensors)
        fixed = DistributedOptimizer._set_main_param_and_optimizer_states
        # replace the wrapped original by a recorder
        cell = [c for c in fixed.__closure__ if callable(c.cell_contents)][0]
        cell.cell_contents = record
        fixed(Fake(), "p", {"param": torch.ones(2), "exp_avg": torch.ones(2)})
        print(sorted(seen), float(seen["step"]))
    """)
    lines = out.split("\n")
    assert lines[0].split() == ["False", "True", "True", "True", "False"]
    assert lines[1] == "['exp_avg', 'param', 'step'] 5.0"


def test_step_fix_not_applied_with_a_fused_adam():
    out = _run("""
        from megatron.core.optimizer import distrib_optimizer
        class FusedAdam:  # what TE or apex would provide
            pass
        FusedAdam.__module__ = "transformer_engine.pytorch.optimizers"
        distrib_optimizer.Adam = FusedAdam
        from megatron_patches.optimizer_compat import apply_torch_adam_step_fix, torch_adam_step_fix_needed
        print(torch_adam_step_fix_needed(), apply_torch_adam_step_fix())
    """)
    assert out.split() == ["False", "False"]


def test_cpu_shim_refuses_with_cuda_unless_forced():
    out = _run("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_patches import apply_cpu_shims, cpu_shims_active
        print(apply_cpu_shims(), cpu_shims_active())
        print(apply_cpu_shims(force=True), cpu_shims_active(), torch.zeros(1, device="cuda").device.type)
    """)
    assert out.split() == ["False", "False", "True", "True", "cpu"]
