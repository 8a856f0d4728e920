"""Long-context evaluation pieces (train/evaluate.py) and the extension presets (report sec 4.3)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from train import evaluate as ev
from train.config import ConfigError, load_config
from train.errors import DataError
from train.model import attention_softmax_scale, rope_inv_freq, rope_tables, yarn_mscale
from train.schedules import Schedules

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT = set(ev.CONTEXT_FIELDS)


# --------------------------------------------------------------------------------------------------
# Passkey prompt


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("length", [40, 64, 201])
def test_needle_lands_at_the_depth_and_the_length_is_exact(depth, length):
    filler = list(range(1000, 1400))
    needle, question = [1, 2, 3, 4, 5], [7, 8, 9]
    prompt = ev.build_passkey_prompt(filler, needle, question, length, depth)
    n = length - len(needle) - len(question)
    k = round(depth * n)
    assert len(prompt.tokens) == length
    assert (prompt.needle_start, prompt.needle_end) == (k, k + len(needle))
    assert prompt.tokens[k:k + len(needle)] == needle
    assert prompt.tokens[-len(question):] == question
    rest = prompt.tokens[:k] + prompt.tokens[k + len(needle):-len(question)]
    assert rest == filler[:n]  # the filler in order, cut by the needle only


def test_prompt_errors():
    with pytest.raises(ConfigError, match="shorter than the needle"):
        ev.build_passkey_prompt(list(range(100)), [1] * 10, [2] * 10, 15, 0.5)
    with pytest.raises(ConfigError, match="depth"):
        ev.build_passkey_prompt(list(range(100)), [1], [2], 20, 1.5)
    with pytest.raises(DataError, match="filler"):
        ev.build_passkey_prompt(list(range(5)), [1], [2], 20, 0.5)


# --------------------------------------------------------------------------------------------------
# Scoring on models that know (or do not know) the answer


class CopyOracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the longest earlier match of the current suffix
    (an ideal induction head): it retrieves a passkey perfectly from anywhere in the context."""

    def __init__(self, vocab: int = 128, max_match: int = 16):
        super().__init__()
        self.vocab, self.max_match = vocab, max_match

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                best, guess = 0, None
                for j in range(t):
                    m = 0
                    while m < self.max_match and j - m >= 0 and row[j - m] == row[t - m]:
                        m += 1
                    if m >= best and m > 0:
                        best, guess = m, row[j + 1]
                if guess is not None:
                    logits[b, t, guess] = 10.0
        return SimpleNamespace(logits=logits)


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


FILLER = encode("abcdefgh ijklmnop qrstuvwx yz, ABCDEF GHIJ KLMN OPQR STUVW XYZ; " * 20)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_model_that_copies_finds_the_key_at_every_depth(depth):
    keys = ["71432", "55555", "12121", "90817"]
    trial = ev.passkey_trial(CopyOracle(), encode, decode, FILLER, 200, depth, keys)
    assert trial.rank == 0 and trial.greedy and trial.margin > 10.0


def test_without_the_needle_the_copier_has_nothing_to_copy():
    keys = ["71432", "55555", "12121", "90817"]
    trial = ev.passkey_trial(CopyOracle(), encode, decode, FILLER, 200, None, keys)
    # nothing supports 71432 (repetitive distractors even gain from copying themselves): not ranked first
    assert trial.rank > 0 and trial.margin <= 0.0 and not trial.greedy


def test_passkey_eval_table_and_control():
    trials = ev.passkey_eval(CopyOracle(), encode, decode, FILLER, lengths=[120, 160], depths=[0.0, 1.0],
                             samples=2, candidates=4, greedy=False)
    assert len(trials) == 2 * 3 * 2  # lengths x (depths + control) x samples
    table = ev.passkey_table(trials, candidates=4)
    cells = {(r["length"], r["depth"]): r for r in table}
    for length in (120, 160):
        assert cells[(length, 0.0)]["accuracy"] == cells[(length, 1.0)]["accuracy"] == 1.0
        assert cells[(length, None)]["accuracy"] == 0.0 and cells[(length, None)]["chance"] == 0.25
    # the same keys at every cell: trial i of every (length, depth) has one key
    assert len({t.key for t in trials}) == 2


def test_candidate_logprobs_read_the_answer_positions():
    vocab = 11
    logits = torch.randn(1, 12, vocab)

    class Fixed(torch.nn.Module):
        def forward(self, tokens):
            return SimpleNamespace(logits=logits[:, : tokens.shape[1]].expand(tokens.shape[0], -1, -1))

    prompt, answers = [3, 4, 5, 6], [[1, 2], [7], [9, 9, 9]]
    got = ev.candidate_logprobs(Fixed(), prompt, answers)
    logp = torch.log_softmax(logits[0].double(), -1)
    want = [sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(a)) for a in answers]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-5)
    assert ev.rank_of_first(torch.tensor([0.5, 0.1, 0.2])) == 0
    assert ev.rank_of_first(torch.tensor([0.5, 0.9, 0.5])) == 2


def test_random_keys_are_distinct_and_of_the_digits():
    import random

    keys = ev.random_keys(random.Random(1), 10, 5)
    assert len(set(keys)) == 10 and all(len(k) == 5 and k[0] != "0" for k in keys)


# --------------------------------------------------------------------------------------------------
# Perplexity


def test_perplexity_is_exp_of_the_mean_cross_entropy(tiny_cfg, random_model):
    model = random_model(tiny_cfg())
    torch.manual_seed(0)
    stream = torch.randint(0, 96, (5 * 16 + 1,))
    windows = ev.token_windows(stream.numpy(), 16, 5)
    assert windows.shape == (5, 17)
    assert torch.equal(windows[1], stream[16:33]) and torch.equal(windows[4, -1], stream[-1])
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    ce = F.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten(), reduction="none").view(5, 16)
    got = ev.perplexity(model, windows, batch_size=2)
    assert got["tokens"] == 80 and got["windows"] == 5
    assert got["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(float(ce.mean())), rel=1e-5)
    assert got["ppl_2nd_half"] == pytest.approx(math.exp(float(ce[:, 8:].mean())), rel=1e-5)


def test_too_few_tokens_for_the_windows():
    with pytest.raises(DataError, match="fewer than 3"):
        ev.token_windows(list(range(40)), 16, 3)


# --------------------------------------------------------------------------------------------------
# Held-out documents


def test_heldout_starts_after_the_bytes_training_read(tmp_path):
    from train.config import DataConfig

    for i, text in enumerate(["a" * 10, "b" * 10, "c" * 10, "d" * 10]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    data = DataConfig(source=str(tmp_path), max_bytes=15)  # training read doc0 and half of doc1
    assert list(ev.heldout_documents(data)) == ["c" * 10, "d" * 10]
    assert list(ev.heldout_documents(dataclasses.replace(data, max_bytes=20))) == ["c" * 10, "d" * 10]
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("xyz")
    assert list(ev.heldout_documents(data, heldout=str(other))) == ["xyz"]
    with pytest.raises(DataError, match="heldout=PATH"):
        list(ev.heldout_documents(dataclasses.replace(data, max_bytes=0)))


# --------------------------------------------------------------------------------------------------
# The launcher's settings


def test_eval_settings_and_their_errors():
    cfg = ev.load_eval_config(["task=passkey", "checkpoint=/x", "lengths=[128,512]", "model.rope_factor=4",
                               "model.max_seq_len=512", "data.max_bytes=100"])
    assert cfg.lengths == [128, 512] and cfg.model.rope_factor == 4.0 and cfg.model.mscale is None
    assert cfg.data.max_bytes == 100 and cfg.data.source is None
    with pytest.raises(ConfigError, match="task=ppl or task=passkey"):
        ev.load_eval_config(["task=niah", "checkpoint=/x"])
    with pytest.raises(ConfigError, match="checkpoint=PATH"):
        ev.load_eval_config(["task=ppl"])
    with pytest.raises(ConfigError) as err:
        ev.load_eval_config(["checkpoint=/x", "model.dim=64"])  # not a context field
    assert "\n" not in str(err.value) and "model.dim" in str(err.value)
    with pytest.raises(ConfigError, match="depths"):
        ev.load_eval_config(["checkpoint=/x", "depths=[0.5,2.0]"])


# --------------------------------------------------------------------------------------------------
# The presets (report sec 4.3: s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1; 1000 steps;
# 32K x 1920, then 128K x 480; LR 7.3e-6)


def _non_context(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in CONTEXT}


@pytest.mark.parametrize("name, length, batch", [("671b_ext32k", 32768, 1920), ("671b_ext128k", 131072, 480)])
def test_671b_extension_presets_hold_the_report_numbers(name, length, batch):
    base = load_config(["+conf=671b"])
    cfg = load_config([f"+conf={name}"])
    m, t = cfg.model, cfg.train
    assert (m.max_seq_len, t.seq_len) == (length, length)
    assert (m.rope_factor, m.original_seq_len, m.beta_slow, m.beta_fast) == (40.0, 4096, 1.0, 32.0)
    assert _non_context(cfg) == _non_context(base)  # the same model: only the context fields change
    assert (cfg.parallel, cfg.fp8, cfg.memory) == (base.parallel, base.fp8, base.memory)

    # sqrt(t) = 0.1 ln s + 1 = 1.3689: the softmax scale is multiplied by it squared, the rope tables by 1
    sqrt_t = 0.1 * math.log(40) + 1
    assert sqrt_t == pytest.approx(1.3689, abs=1e-4)
    assert yarn_mscale(m.rope_factor, m.mscale_all_dim) == pytest.approx(sqrt_t, rel=1e-12)
    plain = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    assert attention_softmax_scale(m) == pytest.approx(plain * sqrt_t**2, rel=1e-12)
    assert attention_softmax_scale(base.model) == pytest.approx(plain, rel=1e-12)
    small = dataclasses.replace(m, max_seq_len=4)  # the tables' scale at position 0 (cos 0 = 1)
    assert rope_tables(small)[0][0].tolist() == pytest.approx([1.0] * (m.qk_rope_head_dim // 2))

    # 1000 steps, no batch ramp, constant LR 7.3e-6, lambda 0.1 and gamma 0 as at the end of pretraining
    assert t.steps == 1000 and t.batch_size == t.batch_size_start == batch
    assert t.total_tokens == 1000 * batch * length
    for step, tokens in [(0, 0), (1, batch * length), (500, 500 * batch * length), (999, 999 * batch * length)]:
        s = Schedules.at(step, tokens, cfg, quantum=2)
        assert (s.lr, s.batch_size, s.mtp_weight, s.bias_update_speed, s.balance_alpha) == (7.3e-6, batch, 0.1, 0.0,
                                                                                            1e-4)
    assert base.optim.lr_tail_values[-1] == cfg.optim.lr  # the final pretraining LR
    assert cfg.checkpoint.init_from  # a placeholder the user replaces (fails loudly if not)


def test_second_stage_differs_from_the_first_only_in_length_and_batch():
    a, b = load_config(["+conf=671b_ext32k"]), load_config(["+conf=671b_ext128k"])
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    differ = {(section, k) for section in da for k in da[section] if da[section][k] != db[section][k]}
    assert differ == {("model", "max_seq_len"), ("train", "seq_len"), ("train", "batch_size"),
                      ("train", "batch_size_start"), ("checkpoint", "init_from")}


@pytest.mark.parametrize("name, base_name, factor, trained, length", [("tiny_ext", "tiny", 4.0, 128, 512),
                                                                      ("small_ext", "small", 8.0, 1024, 8192)])
def test_small_extension_presets(name, base_name, factor, trained, length):
    base, cfg = load_config([f"+conf={base_name}"]), load_config([f"+conf={name}"])
    assert base.train.seq_len == trained == cfg.model.original_seq_len
    assert cfg.model.rope_factor == factor == length / trained
    assert (cfg.model.max_seq_len, cfg.train.seq_len) == (length, length)
    assert _non_context(cfg) == _non_context(base)
    assert cfg.train.batch_size * length == base.train.batch_size * trained  # the pretraining batch in tokens
    assert cfg.optim.lr == base.optim.lr_tail_values[-1]
    for step in (0, 5, cfg.train.steps - 1):
        s = Schedules.at(step, step * cfg.train.batch_size * length, cfg, quantum=cfg.train.micro_batch_size)
        assert (s.lr, s.batch_size, s.mtp_weight, s.bias_update_speed) == (cfg.optim.lr, cfg.train.batch_size, 0.1,
                                                                           0.0)
    # YaRN: the highest-frequency rope pair is kept, the lowest is interpolated by the factor
    f0, f1 = rope_inv_freq(base.model), rope_inv_freq(cfg.model)
    assert f1[0] == pytest.approx(float(f0[0])) and f1[-1] == pytest.approx(float(f0[-1]) / factor)
