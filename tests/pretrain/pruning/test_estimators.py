"""Estimators against brute force on tiny problems (single process, no megatron)."""

import torch

from megatron_patches.norms import RMSNorm


def test_taylor_matches_loss_change_of_removing_a_group_to_first_order():
    # a two-layer SwiGLU MLP; removing FFN channel c zeroes gate row c, up row c, down column c
    torch.manual_seed(0)
    h, f = 16, 32
    x = torch.randn(64, h)
    y = torch.randn(64, h)
    gate = (0.05 * torch.randn(f, h)).requires_grad_()
    up = (0.05 * torch.randn(f, h)).requires_grad_()
    down = (0.05 * torch.randn(h, f)).requires_grad_()

    def loss_fn(g, u, d):
        return ((torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T - y).pow(2).mean()

    loss = loss_fn(gate, up, down)
    loss.backward()
    for c in range(4):
        # removing the channel = removing its fc2 column (the output is linear in it); the
        # vector-form Taylor score -sum(w * g) over that column is the first-order loss change
        first_order = -(down.grad[:, c] @ down[:, c])
        with torch.no_grad():
            d2 = down.clone()
            d2[:, c] = 0
            actual = loss_fn(gate, up, d2) - loss
        assert torch.isclose(first_order, actual, rtol=0.15, atol=1e-9), (c, first_order, actual)


def test_obs_diagonal_and_exact_match_closed_form_on_one_linear():
    # removing input channel j of y = W x with optimal compensation of the other columns costs
    # ||W[:, j]||^2 / [H^-1]_jj for squared error, H = X^T X (SparseGPT/OBS)
    torch.manual_seed(1)
    n, d_in, d_out = 400, 6, 5
    x = torch.randn(n, d_in, dtype=torch.float64) @ torch.randn(d_in, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    hess = x.T @ x
    hinv = torch.linalg.inv(hess)
    for j in range(d_in):
        keep = [k for k in range(d_in) if k != j]
        # brute force: best least-squares refit of the remaining columns
        target = x @ w.T
        sol = torch.linalg.lstsq(x[:, keep], target).solution
        brute = (x[:, keep] @ sol - target).pow(2).sum()
        closed = w[:, j].pow(2).sum() / hinv[j, j]
        assert torch.isclose(brute, closed, rtol=1e-6)
    # the diagonal approximation is exact when inputs are uncorrelated
    q, _ = torch.linalg.qr(torch.randn(n, d_in, dtype=torch.float64))
    x = q * torch.arange(1, d_in + 1, dtype=torch.float64)
    hess = x.T @ x
    diag_score = w.pow(2).sum(0) * torch.diagonal(hess)
    exact = w.pow(2).sum(0) / torch.diagonal(torch.linalg.inv(hess))
    assert torch.allclose(diag_score, exact)


def test_mask_aware_norm_equals_norm_of_the_smaller_width():
    torch.manual_seed(2)
    h = 16
    kept = torch.ones(h, dtype=torch.bool)
    kept[[1, 5, 6, 11]] = False
    norm = RMSNorm(hidden_size=h, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(h) + 0.5)
    x = torch.randn(3, h) * kept  # dropped channels are zero in the residual stream
    norm.set_hidden_mask(kept)
    small = RMSNorm(hidden_size=int(kept.sum()), eps=1e-6)
    with torch.no_grad():
        small.weight.copy_(norm.weight[kept])
    assert torch.allclose(norm(x)[:, kept], small(x[:, kept]), atol=1e-6)
    assert bool((norm(x)[:, ~kept] == 0).all())  # dropped channels stay zero in the residual stream
