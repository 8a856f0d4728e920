"""DeepSeekMoE (report sec 2.1.2, eqs. 12-20): gate, routed experts and the sequence-wise balance loss
against per-token / per-sequence references written with explicit loops."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from train.model import (PADDED_ROWS, MoE, Gate, RoutedExperts, Routing, count_per_expert, expert_ffn_loop,
                         expert_ffn_padded, sequence_balance_loss)

# All fp32. Gate weights and expert outputs are sums of a few products: the loop references differ only
# in summation order, ~1e-7 relative; 1e-5 relative is far below any wrong selection or weighting
# (those change values by O(1e-2) of their scale).
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int,
               topk: int, route_scale: float) -> list[dict[int, float]]:
    """One token at a time: {expert: gate weight} of the selected experts."""
    E = weight.shape[0]
    per_group = E // n_groups
    result = []
    for t in range(x.shape[0]):
        s = torch.sigmoid(weight.double() @ x[t].double())  # (15) affinities
        biased = s + bias.double()  # (16) bias for selection only
        group_score = []
        for g in range(n_groups):
            members = sorted(biased[g * per_group:(g + 1) * per_group].tolist(), reverse=True)
            group_score.append(members[0] + members[1])  # sum of the top-2 biased scores of the group
        kept = sorted(range(n_groups), key=lambda g: -group_score[g])[:topk_groups]
        candidates = [e for e in range(E) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e].item())[:topk]
        total = sum(s[e].item() for e in chosen)
        result.append({e: s[e].item() / total * route_scale for e in chosen})  # (13) unbiased, normalised
    return result


def _gate(cfg, seed=0, bias_std=0.05) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.1)
        gate.bias.normal_(0.0, bias_std)
    return gate


def _as_dicts(routing: Routing) -> list[dict[int, float]]:
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(routing.indices, routing.weights)]


def _assert_same_routing(got: list[dict[int, float]], want: list[dict[int, float]]):
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), f"token {t}: selected {sorted(g)} != reference {sorted(w)}"
        for e in w:
            assert g[e] == pytest.approx(w[e], rel=RTOL), f"token {t}, expert {e}"


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, topk_groups=1),
        dict(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, topk_groups=2),
        dict(n_routed_experts=32, n_activated_experts=8, n_expert_groups=8, topk_groups=4),  # the 671B pattern
    ],
    ids=["one_group", "4_groups_keep_2", "8_groups_keep_4"],
)
def test_gate_matches_per_token_reference(tiny_cfg, shape):
    cfg = tiny_cfg(**shape, route_scale=2.5)
    gate = _gate(cfg)
    x = torch.randn(64, cfg.dim)
    with torch.no_grad():
        routing = gate(x)
    want = naive_gate(x, gate.weight, gate.bias, cfg.n_expert_groups, cfg.topk_groups, cfg.n_activated_experts, 2.5)
    _assert_same_routing(_as_dicts(routing), want)
    assert routing.weights.sum(-1).sub(2.5).abs().max() < 1e-5  # normalised then scaled
    torch.testing.assert_close(routing.scores, torch.sigmoid(x @ gate.weight.t()))
    if cfg.n_expert_groups > 1:  # the group limit binds: a token's experts span at most topk_groups groups
        per_group = cfg.n_routed_experts // cfg.n_expert_groups
        assert max(len(set((i // per_group).tolist())) for i in routing.indices) <= cfg.topk_groups
        # ... and it changes some selection compared with a plain top-k over all experts
        plain = (routing.scores + gate.bias).topk(cfg.n_activated_experts, dim=-1).indices
        assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(plain, routing.indices))


def test_gate_large_bias_changes_selection_not_weights(tiny_cfg):
    cfg = tiny_cfg(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, topk_groups=2, route_scale=2.5)
    gate = _gate(cfg, bias_std=0.0)
    x = torch.randn(64, cfg.dim)
    favoured = 5
    with torch.no_grad():
        before = gate(x)
        gate.bias[favoured] = 10.0
        after = gate(x)
    assert not (before.indices == favoured).any(dim=-1).all()  # without the bias some tokens skip expert 5
    assert (after.indices == favoured).any(dim=-1).all()  # with it every token selects expert 5
    assert torch.equal(after.scores, before.scores)  # the bias never enters the affinities
    # weights are the UNBIASED scores of the selected experts, normalised, times route_scale
    chosen = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    assert (after.weights < 2.5 * 0.9).all()  # a bias of 10 in the weights would give expert 5 nearly all mass
    _assert_same_routing(_as_dicts(after), naive_gate(x, gate.weight, gate.bias, 4, 2, 4, 2.5))


def test_gate_router_runs_in_fp32_under_bf16_autocast(tiny_cfg):
    cfg = tiny_cfg(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, topk_groups=2)
    gate = _gate(cfg)
    x = torch.randn(32, cfg.dim)
    with torch.no_grad():
        reference = gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32_in = gate(x)
            bf16_in = gate(x.bfloat16())
        reference_bf16_in = gate(x.bfloat16().float())
    for r in (fp32_in, bf16_in):
        assert r.scores.dtype == torch.float32 and r.weights.dtype == torch.float32
    # autocast does not touch the router: same numbers as without it (a bf16 F.linear would differ ~1e-3)
    assert torch.equal(fp32_in.scores, reference.scores) and torch.equal(fp32_in.indices, reference.indices)
    assert torch.equal(bf16_in.scores, reference_bf16_in.scores)
    assert torch.equal(bf16_in.weights, reference_bf16_in.weights)


# --------------------------------------------------------------------------------------------------
# Routed experts


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def per_token_experts(x, indices, weights, w1, w2, w3):
    """Eq. 12's routed part: for each token, sum_k g_k * FFN_{e_k}(u_t)."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(indices.shape[1]):
            e = indices[t, k]
            acc = acc + weights[t, k] * swiglu(x[t:t + 1], w1[e], w2[e], w3[e])[0]
        rows.append(acc)
    return torch.stack(rows)


def _experts(cfg, seed=0) -> RoutedExperts:
    torch.manual_seed(seed)
    experts = RoutedExperts(cfg)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0.0, 0.1)
    return experts


def _routing_with_idle_experts(n_tokens, n_experts, topk, used, seed=0) -> Routing:
    """Random routing restricted to the experts in `used` (the others receive no token)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    indices = torch.stack([used[torch.randperm(len(used), generator=g)[:topk]] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, topk, generator=g) + 0.1
    return Routing(weights=weights.requires_grad_(), indices=indices, scores=torch.rand(n_tokens, n_experts))


def _forward_backward(fn, x, params, weights, grad_out):
    for t in (x, weights, *params):
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in (x, weights, *params)]


@pytest.mark.parametrize("impl", ["loop", "loop_padded", "grouped_mm"])
def test_routed_experts_match_per_token_loop_with_gradients(tiny_cfg, impl):
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    cfg = tiny_cfg(n_routed_experts=8, n_activated_experts=2, expert_impl=impl)
    experts = _experts(cfg)
    idle = {3, 6, 7}
    routing = _routing_with_idle_experts(24, 8, 2, used=[e for e in range(8) if e not in idle])
    x = torch.randn(24, cfg.dim, requires_grad=True)
    grad_out = torch.randn(24, cfg.dim)
    params = [experts.w1, experts.w2, experts.w3]
    out, grads = _forward_backward(lambda: experts(x, routing), x, params, routing.weights, grad_out)
    want, want_grads = _forward_backward(
        lambda: per_token_experts(x, routing.indices, routing.weights, *params), x, params, routing.weights, grad_out
    )
    scale = want.abs().max()
    assert (out - want).abs().max() <= RTOL * scale
    for name, g, w in zip(["x", "gate weights", "w1", "w2", "w3"], grads, want_grads):
        assert (g - w).abs().max() <= RTOL * w.abs().max(), name
    for w_grad in grads[2:]:
        assert torch.all(w_grad[sorted(idle)] == 0)  # experts without tokens get exactly zero gradient
        assert torch.all(w_grad[[e for e in range(8) if e not in idle]].abs().sum(dim=(1, 2)) > 0)


def test_padded_rows_change_nothing_but_the_shapes():
    """expert_ffn_padded against expert_ffn_loop in fp64, gradients included: counts around the multiple
    (0, 1, one short, exact, one over) and its shapes are all multiples of it. Tolerance 1e-12 relative:
    fp64 products whose blocking may differ with the row count (~1e-16), far below a misplaced row (O(1))."""
    torch.manual_seed(0)
    m = PADDED_ROWS
    counts = [0, 1, m - 1, m, m + 1, 3]
    e, dim, inter = len(counts), 16, 8
    w1, w3 = (torch.randn(e, inter, dim, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(e, dim, inter, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(counts), dim, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(sum(counts), dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(counts), dim, dtype=torch.float64)
    shapes = []
    results = []
    for fn in (expert_ffn_loop, expert_ffn_padded):
        inputs = (x, weights, w1, w2, w3)
        for t in inputs:
            t.grad = None
        with contextlib.nullcontext() if fn is expert_ffn_loop else _RecordMatmulRows(shapes):
            out = (expert_ffn_loop(x, counts, w1, w2, w3, weights) if fn is expert_ffn_loop
                   else expert_ffn_padded(x, torch.tensor(counts), w1, w2, w3, weights, m))
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for name, got, want in zip(["out", "x", "weights", "w1", "w2", "w3"], results[1], results[0]):
        assert (got - want).abs().max() <= 1e-12 * want.abs().max(), name
    assert shapes and all(rows % m == 0 for rows in shapes)


class _RecordMatmulRows(torch.overrides.TorchFunctionMode):
    """Records the row count of every ``a @ b`` with a 2-D ``a``."""

    def __init__(self, rows: list[int]):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "matmul" and args[0].dim() == 2:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_auto_pads_expert_rows_only_for_half_precision_on_the_cpu(tiny_cfg):
    experts = RoutedExperts(tiny_cfg(expert_impl="auto"))
    assert experts.use_padded_rows(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert experts.use_padded_rows(torch.zeros(2, 2, dtype=torch.float16))
    assert not experts.use_padded_rows(torch.zeros(2, 2))
    assert not experts.use_padded_rows(torch.zeros(2, 2, dtype=torch.bfloat16, device="meta"))
    experts.impl = "loop"
    assert not experts.use_padded_rows(torch.zeros(2, 2, dtype=torch.bfloat16))


def test_routed_experts_when_all_tokens_go_to_one_expert(tiny_cfg):
    cfg = tiny_cfg(n_routed_experts=8, n_activated_experts=1)
    experts = _experts(cfg)
    x = torch.randn(5, cfg.dim)
    routing = Routing(weights=torch.full((5, 1), 0.7), indices=torch.full((5, 1), 4), scores=torch.rand(5, 8))
    with torch.no_grad():
        got = experts(x, routing)
    want = 0.7 * swiglu(x, experts.w1[4], experts.w2[4], experts.w3[4])
    assert (got - want).abs().max() <= RTOL * want.abs().max()


# --------------------------------------------------------------------------------------------------
# Sequence-wise balance loss


def naive_balance_loss(scores, indices, batch, n_experts):
    """Eqs. 17-20 without alpha, per sequence with explicit loops, averaged over sequences."""
    T = scores.shape[0] // batch
    K = indices.shape[1]
    total = 0.0
    for b in range(batch):
        rows = range(b * T, (b + 1) * T)
        loss = 0.0
        for i in range(n_experts):
            count = sum(1 for t in rows if i in indices[t].tolist())
            f_i = n_experts / (K * T) * count  # (18)
            P_i = sum((scores[t, i] / scores[t].sum()).item() for t in rows) / T  # (19), (20)
            loss += f_i * P_i  # (17)
        total += loss
    return total / batch


def test_count_per_expert_is_bincount():
    """The sync-free count (scatter-add) against torch.bincount: random ids, experts never chosen, one
    expert taking every row, no rows."""
    g = torch.Generator().manual_seed(0)
    for ids in (torch.randint(0, 16, (300, 6), generator=g), torch.randint(3, 9, (50, 2), generator=g),
                torch.full((40, 8), 15), torch.zeros(0, 8, dtype=torch.long)):
        counts = count_per_expert(ids, 16)
        assert counts.dtype == torch.int64
        assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=16))


def test_sequence_balance_loss_matches_explicit_loops():
    torch.manual_seed(0)
    batch, T, E, K = 3, 10, 8, 2
    scores = torch.rand(batch * T, E)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(batch * T)])
    indices[:T] = torch.tensor([0, 1])  # the first sequence is maximally unbalanced
    got = sequence_balance_loss(scores, indices, batch, E)
    assert got.item() == pytest.approx(naive_balance_loss(scores, indices, batch, E), rel=1e-6)
    # with equal affinities P_i = 1/E, and sum_i f_i = N_r, so the loss is exactly 1 whatever the selection
    flat = torch.ones(T * 1, E)
    spread = torch.arange(T * K).view(T, K) % E
    assert sequence_balance_loss(flat, spread, 1, E).item() == pytest.approx(1.0, rel=1e-6)


def test_moe_sequences_in_a_batch_do_not_interact(tiny_cfg):
    """Outputs and the balance loss are per sequence: no token dropping, statistics per sequence."""
    cfg = tiny_cfg(n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, topk_groups=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
        moe.gate.bias.normal_(0.0, 0.05)
    a, b, b2 = torch.randn(3, 1, 12, cfg.dim).unbind(0)
    with torch.no_grad():
        out_ab, stats_ab = moe(torch.cat([a, b]))
        out_ab2, stats_ab2 = moe(torch.cat([a, b2]))
        out_a, stats_a = moe(a)
        out_b, stats_b = moe(b)
    assert (out_ab[:1] - out_a).abs().max() <= RTOL * out_a.abs().max()
    assert (out_ab[:1] - out_ab2[:1]).abs().max() <= RTOL * out_a.abs().max()  # sequence 0 ignores sequence 1
    mean = (stats_a.balance_loss + stats_b.balance_loss) / 2
    assert stats_ab.balance_loss.item() == pytest.approx(mean.item(), rel=1e-6)
    assert stats_ab.balance_loss.item() != pytest.approx(stats_ab2.balance_loss.item(), rel=1e-6)
    assert torch.equal(stats_ab.expert_load, stats_a.expert_load + stats_b.expert_load)
    assert int(stats_ab.expert_load.sum()) == 2 * 12 * cfg.n_activated_experts


def test_moe_balance_loss_gradient_reaches_gate_only_through_scores(tiny_cfg):
    """f_i counts selections (no gradient); P_i averages normalised affinities (gradient to the gate)."""
    cfg = tiny_cfg(n_routed_experts=8, n_activated_experts=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
    _, stats = moe(torch.randn(2, 6, cfg.dim))
    stats.balance_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad is None  # the loss does not depend on the experts
