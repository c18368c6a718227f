"""Scoring allocates no full-size temporary (issue 15): the extra memory of one scoring step stays
within one fp32 copy of the largest parameter (Fisher's running g^2, persistent state, excepted).

A one-layer model whose input embedding (vocabulary 4096 x hidden 64, untied, and an output layer
of the same size) is far larger than everything else runs one backward pass; every estimator then
scores it under ``AllocationCounter`` (tests/pretrain/pruning/allocations.py), which counts the
bytes of the tensors torch ops allocate while they are alive. Before the scores stayed on the
device, each parameter's scoring made a product, a full-size zero tensor, a scaled copy and
per-axis sums: several copies of the largest parameter at once.
"""

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.pretrain.common import captured_step

pytestmark = [pytest.mark.distributed]

VOCAB, HIDDEN, FFN, SEQ, BATCH = 4096, 64, 128, 16, 2
CASES = [("taylor", "vector"), ("taylor", "element"), ("fisher", "vector"), ("obs", "vector"),
         ("activation", "vector")]


def _parts(table) -> dict:
    return {part: getattr(table, part).cpu() for part in ("heads", "ffn", "hidden", "embedding", "embedding_signal")}


def measuring_worker(cases, distributed_optimizer):
    from pretrain.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.build import build_model, unwrap
    from pretrain.engines.optim import build_optimizer
    from pretrain.pruning.masks import ModelShape
    from pretrain.pruning import saliency
    from pretrain.pruning.saliency import SaliencyEstimator
    from tests.pretrain.pruning.allocations import AllocationCounter

    init_distributed(1, 1)
    set_random_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                      kv_channels=16, ffn_hidden_size=FFN, seq_length=SEQ,
                      untie_embeddings_and_output_weights=True)
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    train = TrainConfig(micro_batch_size=BATCH, global_batch_size=BATCH, train_iters=1)
    chunks = build_model(cfg, parallel, train, VOCAB, use_te=False)
    optimizer = build_optimizer(chunks, OptimConfig(), parallel, train)
    shape = ModelShape.from_config(cfg, VOCAB)
    largest = max(p.numel() for p in unwrap(chunks[0]).parameters()) * 4  # fp32 bytes
    default_chunk = saliency.SCORE_CHUNK_ELEMENTS
    out = {}
    for kind, form in cases:
        estimator = SaliencyEstimator(kind, shape, chunks, optimizer, taylor_form=form)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
        captured_step(chunks[0], estimator, tokens)
        if kind == "fisher":
            estimator.partial_table()  # the first call allocates the running g^2 (persistent state)
        with AllocationCounter() as counter:
            table = estimator.partial_table()
        # scored a few rows at a time: the temporaries shrink with the pieces, the table is the same
        saliency.SCORE_CHUNK_ELEMENTS = VOCAB * HIDDEN // 8
        # (Fisher: one more step of the running mean of the same g^2 leaves it g^2)
        with AllocationCounter() as chunked_counter:
            chunked = estimator.partial_table()
        saliency.SCORE_CHUNK_ELEMENTS = default_chunk
        table_bytes = sum(t.numel() * t.element_size() for t in
                          (table.heads, table.ffn, table.hidden, table.embedding, table.embedding_signal))
        out[(kind, form)] = {"peak": counter.peak_bytes, "largest_allocation": counter.largest_bytes,
                             "table": table_bytes, "largest_param": largest,
                             "fisher": sum(v.numel() * v.element_size() for v in estimator.fisher.values()),
                             "chunked_peak": chunked_counter.peak_bytes, "table_values": _parts(table),
                             "chunked_values": _parts(chunked)}
        estimator.remove_hooks()
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["distributed-optimizer", "replicated-optimizer"])
def measured(request):
    return run_distributed(measuring_worker, 1, CASES, request.param)[0]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_scoring_allocates_at_most_one_copy_of_the_largest_parameter(measured, case):
    m = measured[case]
    # the model is the size this test means: the embedding dwarfs the tables
    assert m["largest_param"] == VOCAB * HIDDEN * 4 and m["table"] < m["largest_param"] / 20
    # one fp32 copy of the largest parameter, plus the table and per-axis sums (each a small vector)
    assert m["peak"] <= m["largest_param"] + 4 * m["table"], m
    # a piece of an eighth of the embedding at a time: an eighth of the temporaries, the same table
    if case[0] in ("taylor", "fisher"):
        assert m["chunked_peak"] <= m["largest_param"] / 8 + 4 * m["table"], m
    for part, values in m["table_values"].items():  # fp32 sums in another order: rounding apart
        assert part.startswith("embedding") or bool((values != 0).any()), part
        assert torch.allclose(m["chunked_values"][part], values, rtol=1e-5, atol=1e-6 * float(values.abs().max())), part
    if case[0] == "fisher":  # the running g^2 exists and is the one full-size state scoring keeps
        assert m["fisher"] >= m["largest_param"]
