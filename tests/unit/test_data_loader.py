"""Packing and the data-parallel, resumable loader (data/loader.py; report sec 4.1)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data.corpus import iter_documents
from data.loader import TokenLoader
from data.order import EpochOrder
from data.prepare import prepare_data
from data.tokenizer import SpecialTokens
from train.config import DataConfig
from train.errors import DataError

L = 16  # seq_len


def ramp_file(path, n_tokens: int):
    """A real token file whose token k is k: a window is recognisable by its first token."""
    np.arange(n_tokens, dtype="<u4").tofile(path)
    return path


@pytest.fixture
def ramp(tmp_path):
    return ramp_file(tmp_path / "tokens.bin", 41 * L + 1)  # 41 windows: odd, so 2 ranks drop one


def batches(loader: TokenLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_seq_len_plus_one_with_stride_seq_len(ramp):
    loader = TokenLoader(ramp, seq_len=L, micro_batch_size=3, seed=0)
    assert loader.n_windows == 41
    batch = loader.next_batch()
    assert batch.dtype == torch.int64 and batch.shape == (3, L + 1)
    for row in batch:
        start = int(row[0])
        assert start % L == 0 and torch.equal(row, torch.arange(start, start + L + 1))


def test_an_epoch_makes_every_token_a_target_once(ramp):
    loader = TokenLoader(ramp, seq_len=L, micro_batch_size=1, seed=5)
    rows = torch.cat(batches(loader, 41))
    assert sorted(rows[:, 0].tolist()) == [j * L for j in range(41)]
    targets = rows[:, 1:].flatten().sort().values
    assert torch.equal(targets, torch.arange(1, 41 * L + 1))
    assert loader.state_dict()["epoch"] == 0 and loader.next_batch() is not None and loader.epoch == 1


def test_seed_determines_order(ramp):
    a = batches(TokenLoader(ramp, L, 2, seed=1), 10)
    b = batches(TokenLoader(ramp, L, 2, seed=1), 10)
    c = batches(TokenLoader(ramp, L, 2, seed=2), 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    loader = TokenLoader(ramp, L, 1, seed=1)
    assert not np.array_equal(loader.rank_windows(0), loader.rank_windows(1))  # a fresh order every epoch


def test_dp_ranks_are_disjoint_and_cover_the_epoch(ramp):
    ranks = [TokenLoader(ramp, L, micro_batch_size=4, seed=9, dp_rank=r, dp_size=2) for r in range(2)]
    assert [r.windows_per_rank for r in ranks] == [20, 20]
    seen = [set(torch.cat(batches(r, 5))[:, 0].div(L, rounding_mode="floor").tolist()) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]
    order = EpochOrder(41, 9, 0)(np.arange(41))
    assert seen[0] | seen[1] == set(order[:40].tolist())  # the order's remainder is dropped


@pytest.mark.parametrize("consumed", [2, 5, 6])  # mid-epoch, exactly at an epoch end, into the next
def test_resume_gives_identical_following_batches(ramp, consumed):
    first = TokenLoader(ramp, L, micro_batch_size=4, seed=4, dp_rank=1, dp_size=2)  # 20 windows = 5 batches
    batches(first, consumed)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = batches(first, 12)  # crosses at least one epoch boundary
    resumed = TokenLoader(ramp, L, micro_batch_size=4, seed=123, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert resumed.seed == 4
    assert all(torch.equal(x, y) for x, y in zip(expected, batches(resumed, 12)))
    assert resumed.state_dict() == first.state_dict()


def test_mismatched_state_is_refused(ramp, tmp_path):
    state = TokenLoader(ramp, L, 2, seed=0, dp_size=2).state_dict()
    old = {key: value for key, value in state.items() if key != "order"}  # saved before the order was computed
    with pytest.raises(DataError, match=r"saved with window order 1 \(this version uses 2\).*checkpoint.init_from"):
        TokenLoader(ramp, L, 2, seed=0, dp_size=2).load_state_dict(old)
    with pytest.raises(DataError, match=r"seq_len 16 \(checkpoint\) != 8 \(now\)"):
        TokenLoader(ramp, 8, 2, seed=0, dp_size=2).load_state_dict(state)
    other = ramp_file(tmp_path / "other.bin", 50 * L + 1)
    with pytest.raises(DataError, match=r"n_windows 41 \(checkpoint\) != 50 \(now\)"):
        TokenLoader(other, L, 2, seed=0, dp_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="damaged"):
        TokenLoader(ramp, L, 2, seed=0).load_state_dict({**state, "consumed": 42})


@pytest.mark.parametrize("old_dp,new_dp,steps", [(4, 2, 3), (2, 4, 3), (2, 1, 5), (1, 3, 4), (3, 2, 6)])
def test_resume_under_another_dp_size_resplits_without_repeat_or_skip(ramp, old_dp, new_dp, steps):
    """Windows read before and after the change of data-parallel size are disjoint, and together with
    the epoch's rest they are exactly the epoch's order up to the dropped remainder."""
    old = [TokenLoader(ramp, L, micro_batch_size=1, seed=3, dp_rank=r, dp_size=old_dp) for r in range(old_dp)]
    before = [int(b[0, 0]) // L for _ in range(steps) for loader in old for b in [loader.next_batch()]]
    state = old[0].state_dict()
    assert all(loader.state_dict() == state for loader in old)  # one global state
    new = [TokenLoader(ramp, L, micro_batch_size=1, seed=0, dp_rank=r, dp_size=new_dp) for r in range(new_dp)]
    for loader in new:
        loader.load_state_dict(state)
    rounds = (41 - state["consumed"]) // new_dp
    after = [int(b[0, 0]) // L for _ in range(rounds) for loader in new for b in [loader.next_batch()]]
    order = EpochOrder(41, 3, 0)(np.arange(41)).tolist()
    assert sorted(before + after) == sorted(order[: len(before) + len(after)])
    assert before + after == order[: len(before) + len(after)]  # round-robin over ranks keeps the order
    assert all(loader.state_dict()["epoch"] == 0 for loader in new)
    new[0].next_batch()
    assert new[0].state_dict()["epoch"] == 1  # then the next epoch starts from its beginning


def test_too_few_tokens(tmp_path):
    path = ramp_file(tmp_path / "short.bin", 3 * L)  # 2 windows only
    TokenLoader(path, L, 1, seed=0, dp_size=2)
    with pytest.raises(DataError, match=r"48 tokens make 2 windows .* \(17\) tokens, fewer than one per data-parallel "
                                        r"rank \(4\); add data .* or lower train.seq_len"):
        TokenLoader(path, L, 1, seed=0, dp_size=4)
    with pytest.raises(DataError, match="token file not found"):
        TokenLoader(tmp_path / "absent.bin", L, 1, seed=0)


def test_packing_of_a_prepared_stream(tmp_path):
    """EOS after every document; a document longer than a window runs on across windows."""
    cfg = DataConfig(max_bytes=60_000, cache_dir=str(tmp_path), workers=1, fim_rate=0.0)
    prepared = prepare_data(cfg, 512, seed=0)
    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    eos = SpecialTokens.of(tok).eos
    seq_len = 64
    loader = TokenLoader(prepared, seq_len, micro_batch_size=1, seed=0)
    covered = loader.n_windows * seq_len + 1
    stream = np.concatenate([loader.window(j)[:seq_len] for j in range(loader.n_windows)] +
                            [loader.window(loader.n_windows - 1)[-1:]])
    full = np.fromfile(prepared.tokens_path, dtype="<u4")
    assert np.array_equal(stream, full[:covered])
    for j in range(loader.n_windows - 1):  # consecutive windows share exactly one token
        assert loader.window(j)[-1] == loader.window(j + 1)[0]

    starts = np.load(prepared.offsets_path).astype(np.int64)
    ends = np.append(starts[1:], prepared.n_tokens)
    assert (full[ends - 1] == eos).all() and np.count_nonzero(full == eos) == prepared.n_documents
    docs = list(iter_documents(cfg))
    long_doc = next(i for i in range(len(docs)) if ends[i] - starts[i] > 3 * (seq_len + 1) and ends[i] <= covered)
    pieces = [loader.window(j) for j in range(starts[long_doc] // seq_len, (ends[long_doc] - 1) // seq_len + 1)]
    joined = np.concatenate([p[:seq_len] for p in pieces[:-1]] + [pieces[-1]])
    first = (starts[long_doc] // seq_len) * seq_len
    doc_tokens = joined[starts[long_doc] - first: ends[long_doc] - first]
    assert doc_tokens[-1] == eos and len(pieces) > 3
    assert tok.decode(doc_tokens[:-1].tolist(), skip_special_tokens=False) == docs[long_doc]


def test_next_batches_read_what_next_batch_would_and_hint_the_following(ramp):
    """``next_batches(n)`` (the trainer's call per step): the same batches as ``n`` calls of ``next_batch``
    across epochs and changes of n, the state after them the same; it asks the kernel for the pages of the
    next n batches, which ``page_ranges`` gives page-aligned and covering each window's bytes."""
    plain = TokenLoader(ramp, L, micro_batch_size=2, seed=7, dp_rank=1, dp_size=2)
    stepped = TokenLoader(ramp, L, micro_batch_size=2, seed=7, dp_rank=1, dp_size=2)
    for n in [3, 3, 3, 2, 2, 4, 4, 4, 4]:  # 10 batches a rank per epoch: two roll-overs
        got, want = stepped.next_batches(n), batches(plain, n)
        assert len(got) == n and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert stepped.state_dict() == plain.state_dict()
    assert plain.epoch == 2
    ahead = stepped.peek_windows(2)
    assert stepped.state_dict() == plain.state_dict()  # peeking consumes nothing
    assert len(ahead) == 4 and all(torch.equal(stepped.read(ahead[i: i + 2]), plain.next_batch()) for i in (0, 2))
    for (start, length), j in zip(stepped.page_ranges([0, 5, 40]), [0, 5, 40], strict=True):
        first, end = j * L * 4, (j * L + L + 1) * 4
        assert start % mmap.PAGESIZE == 0 and start <= first and start + length == end


def test_a_step_looks_the_order_up_once(ramp, monkeypatch):
    """The read-ahead's lookup of the next step's windows is reused when that step takes them: one order
    lookup per step in steady state (two at the first step, or when n changes), the same batches."""
    calls = []
    lookup = EpochOrder.__call__
    monkeypatch.setattr(EpochOrder, "__call__", lambda self, positions: calls.append(1) or lookup(self, positions))
    loader = TokenLoader(ramp, L, micro_batch_size=2, seed=7, dp_rank=1, dp_size=2)
    plain = TokenLoader(ramp, L, micro_batch_size=2, seed=7, dp_rank=1, dp_size=2)
    counts = []
    for n in [3, 3, 3, 2, 2]:
        before = len(calls)
        got = loader.next_batches(n)
        counts.append(len(calls) - before)
        plain_calls = len(calls)
        assert all(torch.equal(g, w) for g, w in zip(got, batches(plain, n), strict=True))
        del calls[plain_calls:]  # the reference loader's own lookups
    # 10 batches a rank per epoch. n = 3: take + peek, then the peek only; the third step's read-ahead
    # spans two epochs (a lookup each). n = 2: the peek was for 3 batches, so the take looks up again
    # (two epochs) and peeks; then the peek only.
    assert counts == [2, 1, 2, 3, 1]


@pytest.mark.parametrize("n", [1, 2, 3, 41, 1000, 4097, 65536])
def test_epoch_order_is_a_bijection_keyed_by_seed_and_epoch(n):
    """data/order.py: every window exactly once per epoch, whatever n (one above a power of 4: the widest
    cycle walk); the same for the same (seed, epoch), different otherwise; looked up position by position."""
    order = EpochOrder(n, seed=5, epoch=0)
    every = order(np.arange(n))
    assert sorted(every.tolist()) == list(range(n))
    assert np.array_equal(order([n - 1, 0]), every[[n - 1, 0]])  # any positions, any order
    assert np.array_equal(EpochOrder(n, seed=5, epoch=0)(np.arange(n)), every)
    if n >= 41:
        assert not np.array_equal(EpochOrder(n, seed=6, epoch=0)(np.arange(n)), every)
        assert not np.array_equal(EpochOrder(n, seed=5, epoch=1)(np.arange(n)), every)
        # shuffled, not shifted: the first half of the order draws from both halves of the windows
        assert 0.35 < (every[: n // 2] < n // 2).mean() < 0.65
    with pytest.raises(ValueError, match=r"positions must lie in \[0, "):
        order([n])


def test_epoch_order_at_full_scale_needs_no_memory():
    """14.8T tokens in 4096-token windows: 3.6e9 windows, a stored permutation would be 29 GB. Lookups are
    in range, distinct, and the same for the same positions."""
    n = 14_800_000_000_000 // 4096
    order = EpochOrder(n, seed=0, epoch=3)
    positions = np.arange(0, n, n // 1000)[:1000]
    got = order(positions)
    assert got.min() >= 0 and got.max() < n and len(set(got.tolist())) == 1000
    assert np.array_equal(order(positions[::-1]), got[::-1])
