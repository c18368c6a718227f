"""Runs on several nodes (pretrain/nodes.py), on two ranks made to look like two nodes (each the
first rank of its node) whose node-local folders are simulated by one path per rank: the dataset
index cache built once when shared and once per node when node-local; --save that is not shared,
and a --load that the ranks see differently, refused with one message on every rank; the ranks
that share one machine's memory counted without torchrun's LOCAL_WORLD_SIZE."""

from __future__ import annotations

import os

from pretrain.config import ConfigError, DataConfig


def _on_two_nodes(prefix: str, tokenizer_model: str, root: str) -> dict:
    import socket

    import torch
    from megatron.core.datasets import gpt_dataset

    from pretrain.data import build_datasets, load_tokenizer
    from pretrain.nodes import check_run_folders, ranks_on_this_host

    os.environ["LOCAL_RANK"] = "0"  # each rank is the first (the only) one of its node
    del os.environ["LOCAL_WORLD_SIZE"]  # as under srun or mpirun
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    builds = []
    original = gpt_dataset._build_document_index
    gpt_dataset._build_document_index = lambda *a, **k: builds.append(1) or original(*a, **k)

    def build(cache: str) -> tuple[int, list]:
        builds.clear()
        cfg = DataConfig(data_path=[prefix], tokenizer_model=tokenizer_model, split="98,2,0", data_cache_path=cache)
        train = build_datasets(cfg, load_tokenizer(cfg), seq_length=32, seed=1, num_samples=(10, 2, 0))[0]
        return len(builds), [train[i]["tokens"].tolist() for i in range(4)]

    def refusal(check) -> str | None:
        try:
            check()
        except ConfigError as err:
            return str(err)
        return None

    open(f"{root}/a_file", "w").close()
    found = ("x/iter_0000004", {"iteration": 4}) if rank == 0 else None
    return {
        "host": socket.gethostname(),
        "ranks_on_host": ranks_on_this_host(),
        "shared": build(f"{root}/shared_cache"),
        "local": build(f"{root}/node{rank}/cache"),
        "local_again": build(f"{root}/node{rank}/cache"),
        "save_local": refusal(lambda: check_run_folders(f"{root}/node{rank}/ckpt", None, None)),
        "save_shared": refusal(lambda: check_run_folders(f"{root}/ckpt", None, None)),
        "save_unwritable": refusal(lambda: check_run_folders(f"{root}/a_file/ckpt", None, None)),
        "load_differs": refusal(lambda: check_run_folders(None, f"{root}/ckpt", found)),
    }


def test_node_local_index_cache_and_shared_run_folders(tiny_dataset, tmp_path):
    from tests.dist_helper import run_distributed

    r0, r1 = run_distributed(_on_two_nodes, 2, tiny_dataset["prefix"], tiny_dataset["tokenizer"], str(tmp_path),
                             timeout=180)
    # a shared cache: megatron-core's way, rank 0 builds and rank 1 reads
    assert r0["shared"][0] > 0 and r1["shared"][0] == 0
    # node-local: each node's first rank builds its own copy, of the same samples
    assert r0["local"][0] == r1["local"][0] > 0
    assert r0["local"][1] == r1["local"][1] == r0["shared"][1] == r1["shared"][1]
    assert r0["local_again"] == (0, r0["shared"][1]) and r1["local_again"] == (0, r0["shared"][1])
    for node in (0, 1):
        assert any(f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / f"node{node}" / "cache"))

    host = r0["host"]
    assert r0["ranks_on_host"] == r1["ranks_on_host"] == 2  # the memory check divides this machine's by 2
    for rank, r in enumerate((r0, r1)):
        assert r["save_local"] == (
            f"--save {tmp_path}/node{rank}/ckpt is not shared: rank(s) 1 on {host} do not see what rank 0 (on {host}) "
            "writes there. Every rank writes its part of each checkpoint there and reads the in-run shrink's model "
            "from it: give --save a folder on a filesystem every node mounts")
        assert r["save_shared"] is None
        assert r["save_unwritable"].startswith(f"--save {tmp_path}/a_file/ckpt: cannot create or write it (rank 0 on")
        assert r["load_differs"] == (
            f"--load {tmp_path}/ckpt: rank 0 (on {host}) finds 'x/iter_0000004 (iteration 4)', rank 1 (on {host}) "
            "finds 'no checkpoint'; put it on a filesystem every node mounts")
    assert os.listdir(tmp_path / "ckpt") == []  # the markers are gone
