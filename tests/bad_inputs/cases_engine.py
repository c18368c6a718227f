"""Bad inputs to the DeepSpeed engine flags (issue 17): each fails before any process group starts."""

from __future__ import annotations

from tests.bad_inputs.harness import BadInput
from tests.bad_inputs.cases_train import _train


def _json(path, text: str) -> str:
    path.write_text(text)
    return str(path)


CASES = [
    BadInput("engine-unknown-zero-stage", lambda d, f: _train(f, "--engine", "deepspeed", "--zero-stage", "4"),
             message=r"--zero-stage 4: DeepSpeed ZeRO has stages 1, 2 and 3"),
    BadInput("engine-zero-stage-without-deepspeed", lambda d, f: _train(f, "--zero-stage", "2"),
             message=r"--zero-stage needs --engine deepspeed"),
    BadInput("engine-deepspeed-config-not-json",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"zero_optimization": {"stage": 2,}}')),
             message=r"--deepspeed-config .*ds\.json line 1 column \d+: not valid JSON"),
    BadInput("engine-deepspeed-config-contradicts-batch",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"train_batch_size": 64}')),
             message=r"train_batch_size 64 contradicts --global-batch-size \(2\)"),
    BadInput("engine-deepspeed-config-own-optimizer",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"optimizer": {"type": "Lamb"}}')),
             message=r"remove its \"optimizer\" section \(the optimizer is AdamW from --lr"),
    BadInput("engine-deepspeed-config-bad-stage",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"zero_optimization": {"stage": 0}}')),
             message=r"zero_optimization.stage 0: DeepSpeed ZeRO has stages 1, 2 and 3"),
    BadInput("engine-deepspeed-pipeline-parallel",
             lambda d, f: _train(f, "--engine", "deepspeed", "--pipeline-model-parallel-size", "2"),
             message=r"--engine deepspeed with --pipeline-model-parallel-size 2: not supported"),
    BadInput("engine-deepspeed-bf16-optimizer",
             lambda d, f: _train(f, "--engine", "deepspeed", "--bf16", "--deepspeed-config",
                                 _json(d / "ds.json", '{"data_types": {"grad_accum_dtype": "fp32"}}')),
             message=r"data_types.grad_accum_dtype fp32 with --bf16 and ZeRO-1 makes DeepSpeed use its BF16_Optimizer"),
    BadInput("engine-deepspeed-config-nvme-offload",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"zero_optimization": {"stage": 3, "offload_optimizer": '
                                                      '{"device": "nvme", "nvme_path": "/tmp"}}}')),
             message=r"zero_optimization.offload_optimizer.device nvme is not supported"),
    BadInput("engine-deepspeed-config-node-local-checkpoints",
             lambda d, f: _train(f, "--engine", "deepspeed", "--deepspeed-config",
                                 _json(d / "ds.json", '{"checkpoint": {"use_node_local_storage": true}}')),
             message=r"checkpoint.use_node_local_storage is not supported: checkpoints go to --save, one folder "
                     r"every node shares"),
    BadInput("engine-offload-unknown-device",
             lambda d, f: _train(f, "--engine", "deepspeed", "--offload-optimizer", "nvme"),
             message=r"argument --offload-optimizer: invalid choice: 'nvme'"),
]
