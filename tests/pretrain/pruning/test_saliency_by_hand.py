"""Each saliency estimator against its score computed by hand.

A two-layer model small enough to write out (hidden 8, two query groups of two heads with q/k/v
biases, 8 FFN channels, vocabulary 16, tied embeddings) runs two scoring steps through megatron-core
in a world of one. The test then recomputes every table entry in plain torch from the weights, the
gradients and the linears' inputs, with each group's weights listed here from FACTS.md (the q, k
and v rows of query group g, the gate and up rows of FFN channel c, the columns and rows of
hidden channel j), not through ``pretrain.model.layout``. The numbers must agree, not only the tables
across layouts (tests/pretrain/pruning/test_pruning_distributed.py).
"""

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.pretrain.common import captured_step

pytestmark = [pytest.mark.distributed]

LAYERS, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB, SEQ, BATCH = 2, 8, 4, 2, 4, 8, 16, 8, 2
HPG = HEADS // GROUPS
CASES = [("taylor", "vector", False), ("taylor", "element", False), ("fisher", "vector", False),
         ("obs", "vector", False), ("obs", "vector", True), ("activation", "vector", False)]
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def scoring_worker(cases):
    """Per case: (the estimator's reduced table, the weights, per-step gradients and linear inputs)."""
    from pretrain.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
    from pretrain.distributed import init_distributed, set_random_seed
    from pretrain.model.init import deterministic_init
    from pretrain.model.build import build_model, unwrap
    from pretrain.engines.optim import build_optimizer
    from pretrain.pruning.masks import ModelShape
    from pretrain.pruning.saliency import SaliencyEstimator, reduce_table

    init_distributed(1, 1)
    set_random_seed(0)
    cfg = ModelConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
                      kv_channels=HEAD_DIM, ffn_hidden_size=FFN, seq_length=SEQ, add_qkv_bias=True)
    train = TrainConfig(micro_batch_size=BATCH, global_batch_size=BATCH, train_iters=1)
    out = []
    for kind, form, exact in cases:
        chunks = build_model(cfg, ParallelConfig(), train, VOCAB, use_te=False)
        model = unwrap(chunks[0])
        deterministic_init(model, 0, 0.3, LAYERS)
        with torch.no_grad():  # norms away from one, so that their share is visible
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))))
        optimizer = build_optimizer(chunks, OptimConfig(), ParallelConfig(), train)
        shape = ModelShape.from_config(cfg, VOCAB)
        estimator = SaliencyEstimator(kind, shape, chunks, optimizer, taylor_form=form, obs_exact=exact)
        inputs = {}

        def capture(name):
            def hook(module, args):
                inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            return hook

        modules = dict(model.named_modules())
        for name in [f"decoder.layers.{l}.{m}" for l in range(LAYERS) for m in LINEARS] + ["output_layer"]:
            modules[name].register_forward_pre_hook(capture(name))
        grads = []
        for step in range(2):
            g = torch.Generator().manual_seed(100 + step)
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
            captured_step(chunks[0], estimator, tokens)
            table = reduce_table(estimator.partial_table(), shape, estimator.signed)
            grads.append({n: p.main_grad.detach().double().clone() for n, p in model.named_parameters()})
        weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        out.append({"table": table, "weights": weights, "grads": grads, "inputs": inputs})
    return out


@pytest.fixture(scope="module")
def scored():
    return dict(zip(CASES, run_distributed(scoring_worker, 1, CASES)[0]))


# --- the groups' weights, written out ----------------------------------------------------------------

def _layer(l, rest):
    return f"decoder.layers.{l}.{rest}"


def _group_elements(l, g, values):
    """The elements of query group g of layer l in ``values`` (name -> tensor)."""
    rows = slice(g * (HPG + 2) * HEAD_DIM, (g + 1) * (HPG + 2) * HEAD_DIM)  # q heads, k, v of group g
    columns = slice(g * HPG * HEAD_DIM, (g + 1) * HPG * HEAD_DIM)  # its heads' output-projection inputs
    return [values[_layer(l, "self_attention.linear_qkv.weight")][rows],
            values[_layer(l, "self_attention.linear_qkv.bias")][rows],
            values[_layer(l, "self_attention.linear_proj.weight")][:, columns]]


def _ffn_elements(l, c, values):
    fc1 = values[_layer(l, "mlp.linear_fc1.weight")]
    return [fc1[c], fc1[FFN + c], values[_layer(l, "mlp.linear_fc2.weight")][:, c]]  # gate, up, down


def _hidden_elements(j, values):
    """Hidden channel j outside the input embedding (whose share is scaled, see below)."""
    out = [values["decoder.final_layernorm.weight"][j]]
    for l in range(LAYERS):
        out += [values[_layer(l, "self_attention.linear_qkv.weight")][:, j],
                values[_layer(l, "self_attention.linear_proj.weight")][j],
                values[_layer(l, "mlp.linear_fc1.weight")][:, j],
                values[_layer(l, "mlp.linear_fc2.weight")][j],
                values[_layer(l, "input_layernorm.weight")][j],
                values[_layer(l, "pre_mlp_layernorm.weight")][j]]
    return out


def _gradient_table(per_element, signed):
    """Group sums of an element score (name -> tensor); a hidden channel's embedding column counts
    its unseen rows (score exactly 0) at the mean of its seen ones; vector form: |sum|."""
    heads = torch.tensor([[sum(float(t.sum()) for t in _group_elements(l, g, per_element)) for g in range(GROUPS)]
                          for l in range(LAYERS)])
    ffn = torch.tensor([[sum(float(t.sum()) for t in _ffn_elements(l, c, per_element)) for c in range(FFN)]
                        for l in range(LAYERS)])
    embedding = per_element["embedding.word_embeddings.weight"]
    hidden = []
    for j in range(HIDDEN):
        seen = max(int((embedding[:, j] != 0).sum()), 1)
        hidden.append(sum(float(t.sum()) for t in _hidden_elements(j, per_element))
                      + float(embedding[:, j].sum()) * VOCAB / seen)
    tables = [heads, ffn, torch.tensor(hidden)]
    return [t.abs() for t in tables] if signed else tables


def _input_table(kind, weights, inputs, exact=False):
    """Per input channel of each linear: obs sum_r w_rj^2 * mean x_j^2 (or / [H^-1]_jj exactly), or
    activation mean |x_j|; a proj input column counts for its query group, an fc2 input for its
    FFN channel, qkv/fc1/output inputs for their hidden channel."""
    def per_channel(linear, weight):
        x = torch.cat(inputs[linear])
        if kind == "activation":
            return x.abs().mean(0)
        w2 = (weight ** 2).sum(0)
        if not exact:
            return w2 * (x ** 2).mean(0)
        h = x.T @ x / x.shape[0]
        damp = 0.01 * torch.diagonal(h).mean()
        return w2 / torch.diagonal(torch.linalg.inv(h + damp * torch.eye(h.shape[0], dtype=h.dtype)))

    heads, ffn, hidden = torch.zeros(LAYERS, GROUPS), torch.zeros(LAYERS, FFN), torch.zeros(HIDDEN)
    for l in range(LAYERS):
        proj = per_channel(_layer(l, "self_attention.linear_proj"), weights[_layer(l, "self_attention.linear_proj.weight")])
        for g in range(GROUPS):
            heads[l, g] = proj[g * HPG * HEAD_DIM:(g + 1) * HPG * HEAD_DIM].sum()
        ffn[l] = per_channel(_layer(l, "mlp.linear_fc2"), weights[_layer(l, "mlp.linear_fc2.weight")])
        hidden += per_channel(_layer(l, "self_attention.linear_qkv"), weights[_layer(l, "self_attention.linear_qkv.weight")])
        hidden += per_channel(_layer(l, "mlp.linear_fc1"), weights[_layer(l, "mlp.linear_fc1.weight")])
    # tied: the output layer multiplies its input by the embedding
    hidden += per_channel("output_layer", weights["embedding.word_embeddings.weight"])
    return [heads, ffn, hidden]


def _expected(case, run):
    kind, form, exact = case
    w, grads = run["weights"], run["grads"]
    if kind == "taylor":
        last = grads[-1]
        element = {n: w[n] * last[n] if form == "vector" else (w[n] * last[n]).abs() for n in w}
        return _gradient_table(element, signed=form == "vector")
    if kind == "fisher":  # 1/2 w^2 F, F the running mean of g^2 over the scoring steps
        fisher = {n: sum(g[n] ** 2 for g in grads) / len(grads) for n in w}
        return _gradient_table({n: 0.5 * w[n] ** 2 * fisher[n] for n in w}, signed=False)
    # the table of the last step; inputs of both steps were captured, the estimator restarts each step
    last_inputs = {name: xs[-1:] for name, xs in run["inputs"].items()}
    return _input_table(kind, w, last_inputs, exact)


@pytest.mark.parametrize("case", CASES, ids=["-".join(str(x) for x in c) for c in CASES])
def test_estimator_equals_the_score_by_hand(scored, case):
    run = scored[case]
    table = run["table"]
    for name, got, expected in zip(("heads", "ffn", "hidden"), (table.heads, table.ffn, table.hidden),
                                   _expected(case, run)):
        expected = expected.double()
        assert got.shape == expected.shape, (case, name)
        assert float(expected.abs().min()) > 0, (case, name)  # every entry got a signal
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7 * float(expected.abs().max())), \
            (case, name, got, expected)
