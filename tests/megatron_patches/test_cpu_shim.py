"""The CPU shim: inactive when CUDA exists; each patch does what its comment says.

Run in fresh interpreters, because the shim changes process-wide state."""

import subprocess
import sys
import textwrap



def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_noop_when_cuda_is_available():
    out = _run("""
        import torch
        original_cuda, original_type = torch.Tensor.cuda, torch.Tensor.type
        torch.cuda.is_available = lambda: True
        from megatron_patches import apply_cpu_shims, cpu_shims_active
        print(apply_cpu_shims(), cpu_shims_active(),
              torch.Tensor.cuda is original_cuda and torch.Tensor.type is original_type)
    """)
    assert out.split() == ["False", "False", "True"]


def test_each_patch_on_cpu():
    out = _run("""
        import torch
        assert not torch.cuda.is_available()
        from megatron_patches import apply_cpu_shims
        assert apply_cpu_shims() is True
        # 1: current_device is usable as a device
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        # 2: literal cuda devices become cpu
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        # 3: .cuda() and synchronize are no-ops
        t = torch.ones(2); assert t.cuda() is t; torch.cuda.synchronize()
        # 4: RNG tracker forks work and are reproducible
        from megatron.core import tensor_parallel
        from pretrain.distributed import init_distributed
        init_distributed(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            a = torch.rand(3)
        tensor_parallel.model_parallel_cuda_manual_seed(5, force_reset_rng=True)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            b = torch.rand(3)
        assert torch.equal(a, b)
        # 5: type strings for dtype checks; casting still casts
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        assert torch.ones(1, dtype=torch.int64).type() == "torch.LongTensor"
        # 6: streams/events
        s = torch.cuda.current_stream(); s.wait_stream(s); torch.cuda.Event().record()
        print("ok")
    """)
    assert out.strip() == "ok"
