"""The pick study: does FlowRL keep the spread of correct answers? flowrl.py's training, measured as it goes.

    python bench/pick_study.py --task pick --max-new-tokens 12 --steps 80 --eval-every 10 --answer-samples 64
    python bench/pick_study.py --resume runs/X                  # continues the run and its measurements
    torchrun --nproc_per_node=2 bench/pick_study.py ...          # as flowrl.py

Every flag but the two below is flowrl.py's (`python flowrl.py --help`); the run is flowrl.py's own, with this
study beside it through flowrl.py's `Study` hook: the same rollouts, updates and records, with these added.

At every evaluation, on fixed probe questions (the first of the seed-independent split: with the pick task every
held-out question and as many training ones; elsewhere --answer-prompts of each), as `held_out_...` and `train_...`,
each a mean over questions with its 95% interval (`..._ci95`):
- sampled, --answer-samples completions a question at --temperature and top-p 1 on the first --answer-prompts
  (`sampled_questions`): `validity`, `distinct_correct`, the `entropy` of the correct answers' distribution and its
  smoothed `kl_to_step0` (on the `kl_prompts` with correct answers on both sides; at step 0 a second draw of the
  same model: the noise floor);
- exact (pick task), from each correct answer's scored log-prob (`exact_questions`): `exact_entropy`,
  `exact_kl_to_step0` and `ratio_spread`, the sd of log pi_theta / pi_ref over a question's correct answers, 0 at
  Eq. 2's target p* ~ pi_ref exp(beta r), which keeps pi_ref's preferences among answers of equal reward;
- Eq. 3's fixed point on the sampled questions, from pi_ref's step-0 validity p: p*'s `target_validity`,
  e^beta p / (e^beta p + 1 - p), and `target_log_z`, log(1 + (e^beta - 1) p); beside them `log_z`, the head's;
- `histogram`: one training question's answers, printed at the first and the last evaluation; `answer_samples`.
After every training step, what FlowRL's loss did (`loss_metrics`: the residual split into what log Z should absorb
and what only the policy can remove, and the slope of Eq. 6's log-ratio on beta r_hat, 0 before the policy moves
towards the target, 1 at it); on the pick task `distinct_correct_per_group`, and `rare_correct_frac`, the rollouts
whose answer is correct and holds under RARE_SHARE of pi_ref's probability over the question's correct answers.
The step-0 answers (what the KL and the ratio spread compare with) are kept in the checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":     # before torch loads (flowrl imports it): flowrl.py's OpenMP spin count for a run
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
import flowrl  # noqa: E402
from flowrl import Problem, Run  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

RARE_SHARE = 0.1   # a correct answer pi_ref rarely samples: under this share of its probability over the correct ones


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
    p_total, q_total = (sum(counts.values()) + alpha * len(support) for counts in (p_counts, q_counts))
    p = {answer: (p_counts.get(answer, 0) + alpha) / p_total for answer in support}
    return sum(p[answer] * math.log(p[answer] / ((q_counts.get(answer, 0) + alpha) / q_total)) for answer in support)


def ratio_spread(logprobs: dict, step0_logprobs: dict) -> float:
    """The standard deviation, over a prompt's correct answers, of log pi_theta(y|x) - log pi_0(y|x), pi_0 the
    step-0 policy (pi_ref, as the policy scores it).

    >>> ratio_spread({"3": -1.0, "7": -2.0}, {"3": -1.5, "7": -2.5})    # both answers moved by +0.5: kept
    0.0
    >>> ratio_spread({"3": -1.0, "7": -3.0}, {"3": -2.0, "7": -2.0})    # "3" up by 1, "7" down by 1
    1.0
    """
    return float(np.std([logprobs[answer] - step0_logprobs[answer] for answer in logprobs]))


def answer_entropy(logprobs: dict) -> float:
    """Entropy (nats) of the policy's distribution over a prompt's correct answers, exact: each answer's scored
    log pi(y|x), renormalised over the correct answers. No sampling noise, and no bias from how many samples were
    correct (a plug-in entropy from n samples reads about (K - 1) / 2n low, Miller-Madow).

    >>> round(answer_entropy({"3": math.log(0.1), "7": math.log(0.1)}), 4), answer_entropy({"3": -2.0})
    (0.6931, 0.0)
    """
    log_p = torch.tensor(list(logprobs.values()), dtype=torch.float64).log_softmax(0)
    return float(-(log_p.exp() * log_p).sum()) + 0.0      # + 0.0: one answer gives 0.0, not -0.0


def answer_kl(logprobs: dict, step0_logprobs: dict) -> float:
    """KL(policy || step-0 policy) between their distributions over a prompt's correct answers, exact, each
    renormalised over those answers: 0 when every correct answer has the same log-ratio log pi_theta / pi_0.

    >>> answer_kl({"3": -1.0, "7": -2.0}, {"3": -1.5, "7": -2.5})    # both moved by +0.5: pi_ref's preferences kept
    0.0
    >>> round(answer_kl({"3": -0.1, "7": -5.0}, {"3": -1.0, "7": -1.0}), 2)
    0.65
    """
    answers = list(step0_logprobs)
    log_p = torch.tensor([logprobs[a] for a in answers], dtype=torch.float64).log_softmax(0)
    log_q = torch.tensor([step0_logprobs[a] for a in answers], dtype=torch.float64).log_softmax(0)
    return float((log_p.exp() * (log_p - log_q)).sum())


def with_intervals(per_question: dict[str, list], prefix: str) -> dict:
    """For each list of per-question values, {prefix_name: the mean, prefix_name_ci95: the half-width of its 95%
    confidence interval, 1.96 sample sd / sqrt(n)} (the normal approximation); None where there are too few.

    >>> {k: round(v, 4) for k, v in with_intervals({"x": [1.0, 2.0, 3.0]}, "held_out").items()}
    {'held_out_x': 2.0, 'held_out_x_ci95': 1.1316}
    """
    metrics = {}
    for name, values in per_question.items():
        metrics[f"{prefix}_{name}"] = float(np.mean(values)) if values else None
        metrics[f"{prefix}_{name}_ci95"] = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) \
            if len(values) > 1 else None
    return metrics


def distribution_metrics(counted: list[dict], step0_counted: list[dict], prefix: str) -> dict:
    """The sampled measures, means over questions with their 95% intervals: validity, distinct correct answers,
    entropy of the correct-answer distribution, and its smoothed KL to the step-0 model's (questions where either
    has no correct answer skipped: `kl_prompts` counts the others)."""
    kls = [smoothed_kl(now["correct"], then["correct"]) for now, then in zip(counted, step0_counted)]
    kls = [kl for kl in kls if kl is not None]
    n = sum(counted[0]["answers"].values())
    return {**with_intervals({"validity": [sum(c["correct"].values()) / n for c in counted],
                              "distinct_correct": [len(c["correct"]) for c in counted],
                              "entropy": [entropy(c["correct"]) for c in counted],
                              "kl_to_step0": kls}, prefix),
            f"{prefix}_kl_prompts": len(kls), f"{prefix}_sampled_questions": len(counted)}


def exact_metrics(logprobs: list[dict], step0_logprobs: list[dict], prefix: str) -> dict:
    """The exact measures (pick task), means over questions with their 95% intervals: the ratio spread, and the
    entropy of the correct-answer distribution and its KL to the step-0 policy's, from scored log-probs."""
    pairs = list(zip(logprobs, step0_logprobs))
    return {**with_intervals({"ratio_spread": [ratio_spread(now, then) for now, then in pairs],
                              "exact_entropy": [answer_entropy(now) for now in logprobs],
                              "exact_kl_to_step0": [answer_kl(now, then) for now, then in pairs]}, prefix),
            f"{prefix}_exact_questions": len(pairs)}


def eq3_target(validity: float, beta: float) -> tuple[float, float]:
    """Eq. 3's target p* = pi_ref exp(beta r) / Z with a 0/1 reward, on a question pi_ref answers correctly with
    probability `validity` (p): p*'s validity e^beta p / (e^beta p + 1 - p), and log Z = log(1 + (e^beta - 1) p),
    the value Eq. 6's head reaches at that fixed point when the loss sees r itself and no 1/|y|.

    >>> [round(x, 3) for x in eq3_target(0.16, 5.0)]
    [0.966, 3.202]
    """
    log_z = math.log1p(math.expm1(beta) * validity)
    return math.exp(beta + math.log(validity) - log_z) if validity > 0 else 0.0, log_z


def target_metrics(step0_counted: list[dict], beta: float, prefix: str) -> dict:
    """Eq. 3's target on the sampled probe questions, from pi_ref's validity there (the step-0 samples): the mean
    validity and log Z of p*, with their 95% intervals."""
    n = sum(step0_counted[0]["answers"].values())
    targets = [eq3_target(sum(c["correct"].values()) / n, beta) for c in step0_counted]
    return with_intervals({"target_validity": [t[0] for t in targets], "target_log_z": [t[1] for t in targets]},
                          prefix)


@torch.no_grad()
def head_log_z(run: Run, problems: list[Problem]) -> Optional[list[float]]:
    """The log Z head's value on each problem's prompt (without dropout), or None without a head."""
    if run.log_z_head is None:
        return None
    encoded = run.tokenizer([flowrl.format_prompt(run.tokenizer, p.question) for p in problems], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(run.runtime.device)
    was_training = run.log_z_head.training
    run.log_z_head.eval()
    try:
        with run.runtime.autocast():
            hidden = run.policy(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                                position_ids=flowrl.position_ids_from_mask(encoded.attention_mask),
                                output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            return run.log_z_head(hidden, encoded.attention_mask).float().tolist()
    finally:
        run.log_z_head.train(was_training)


def sample_answers(run: Run, problems: list[Problem], indices: list[int], samples: int, seed_key: tuple,
                   progress=None) -> list[dict]:
    """`samples` completions of each problems[i], i in indices, at the training temperature and top-p 1 (the
    distribution training matches), problem i's from the seed (*seed_key, i); for each, how often each final
    answer came, and each correct one."""
    counted = []
    for chunk, rollouts in flowrl.sample_problems(run, problems, indices, samples, seed_key,
                                                  temperature=run.cfg.temperature):
        rewards = flowrl.rewards_of(rollouts.texts, [problems[i] for i in chunk], samples, run.reward_fn)
        for g in range(len(chunk)):
            group = slice(g * samples, (g + 1) * samples)
            answers = [flowrl.final_answer(text) or "(no answer)" for text in rollouts.texts[group]]
            correct = [answer for answer, r in zip(answers, rewards[group]) if r == 1.0]
            counted.append({"answers": dict(collections.Counter(answers)),
                            "correct": dict(collections.Counter(correct))})
        if progress is not None:
            progress.update()
    return counted


@torch.no_grad()
def answer_logprobs(model, run: Run, problems: list[Problem]) -> list[dict]:
    """The exact log pi(y|x) (at the training temperature) of each correct answer of each pick problem under
    `model`, written as the chat template frames a response: the bare number, then EOS (one phrasing; the sampled
    measures see all). Scored, not sampled: a question's answers share one pass over its prompt (padded to one
    count by repeating the last), --micro-batch-size questions a pass. Eq. 6's fixed point gives responses of equal
    length and reward the same ratio pi_theta / pi_ref: their log-ratios spread as the policy leaves pi_ref's
    preferences."""
    tokenizer, device = run.tokenizer, next(model.parameters()).device
    answers = [list(problem.answers) for problem in problems]
    width = max(map(len, answers))                                                            # rows per question
    prompts = tokenizer([flowrl.format_prompt(tokenizer, problem.question) for problem in problems],
                        return_tensors="pt", padding=True, add_special_tokens=False).to(device)   # [P, L]
    responses = [tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                 for listed in answers for answer in listed + listed[-1:] * (width - len(listed))]
    longest = max(map(len, responses))
    completion_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in responses],
                                  device=device)                                             # [P * width, T]
    completion_mask = (torch.arange(longest, device=device) < torch.tensor([len(ids) for ids in responses],
                                                                           device=device)[:, None]).long()
    rollouts = flowrl.Rollouts(
        input_ids=torch.cat([prompts.input_ids.repeat_interleave(width, dim=0), completion_ids], 1),
        attention_mask=torch.cat([prompts.attention_mask.repeat_interleave(width, dim=0), completion_mask], 1),
        prompt_length=prompts.input_ids.shape[1], completion_mask=completion_mask,
        truncated=torch.zeros(len(responses), dtype=torch.bool), texts=[""] * len(responses))
    passes = flowrl.forward_passes(torch.arange(len(problems)), width, run.cfg.micro_batch_size * width)
    token_logprobs = flowrl.batched_token_logprobs(model, rollouts, run.cfg.temperature, passes, run.runtime)
    sequence = (token_logprobs * rollouts.completion_mask).sum(-1).view(len(problems), width).tolist()
    return [dict(zip(listed, row)) for listed, row in zip(answers, sequence)]     # zip drops the padding


def rollout_coverage(run: Run, problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """Which correct answers a step's rollouts reached (pick task), summed over this process's groups: the distinct
    correct final answers of each group, and `rare_correct`, the rollouts whose answer is correct and holds under
    RARE_SHARE of pi_ref's probability over the question's correct answers (the bare answers scored exactly by
    answer_logprobs; not counted without pi_ref): what exploration should add."""
    G, distinct, rare = run.cfg.group_size, 0, 0
    ref_logprobs = answer_logprobs(run.ref_model, run, problems) if run.ref_model is not None else None
    for g in range(len(problems)):
        correct = set(problems[g].answers)                # the answers pick_reward and answer_logprobs take
        answers = [answer for answer in map(flowrl.final_answer, texts[g * G:(g + 1) * G]) if answer in correct]
        distinct += len(set(answers))
        if ref_logprobs is not None:
            share = dict(zip(ref_logprobs[g], torch.tensor(list(ref_logprobs[g].values()), dtype=torch.float64)
                             .softmax(0).tolist()))
            rare += sum(share[answer] < RARE_SHARE for answer in answers)
    return {"distinct_correct": float(distinct), "groups": float(len(problems)), "sequences": float(len(texts)),
            **({"rare_correct": float(rare)} if run.ref_model is not None else {})}


def loss_diagnostics(rewards: torch.Tensor, residual: torch.Tensor, log_z: torch.Tensor, reward_hat: torch.Tensor,
                     beta: float, group_size: int) -> dict[str, float]:
    """What the loss did, as sums over this process's groups in FlowRL's loss (loss_metrics makes them means).
    rewards, residual, log_z, reward_hat [B], groups contiguous; residual and log_z NaN outside the loss. The
    residual splits into its group means (what log Z should absorb; `log_z_target` would zero them) and the part
    within groups, which only the policy removes: beta r_hat while its log-ratios to pi_ref are all equal (the loss
    then acts as a policy gradient on r_hat), 0 at the target. The slope of Eq. 6's log-ratio on beta r_hat within
    groups, log_ratio_reward_cov / beta_reward_hat_sq: 0 before the policy moves towards the target, 1 at it.

    >>> d = loss_diagnostics(torch.tensor([1., 0, 1, 1]), torch.tensor([1., -1, 0.5, 0.5]), torch.zeros(4),
    ...                      torch.tensor([.7, -.7, 0, 0]), 1.0, 2)
    >>> d["equal_reward_groups"], d["residual_group_mean_sq"], d["residual_within_sq"], d["log_z_target"]
    (1.0, 0.25, 2.0, -0.5)
    >>> round(d["log_ratio_reward_cov"] / d["beta_reward_hat_sq"], 2)    # log-ratios +-1.7 for beta r_hat +-0.7
    2.43
    """
    equal = flowrl.equal_reward_groups(rewards, group_size)                                      # [groups]
    diagnostics = {"groups": float(len(equal)), "equal_reward_groups": float(equal.sum())}
    residual = residual.view(-1, group_size)
    in_loss = ~residual.isnan().any(-1)                                                   # [groups]
    if not in_loss.any():                                                                 # GRPO, or none in the loss
        return diagnostics
    residual, log_z = residual[in_loss], log_z.view(-1, group_size)[in_loss]               # [groups in loss, G]
    beta_reward_hat = beta * reward_hat.view(-1, group_size)[in_loss]
    group_mean = residual.mean(-1, keepdim=True)                                          # [groups in loss, 1]
    log_ratio = residual - log_z + beta_reward_hat               # as residual = log Z + log-ratio - beta r_hat
    log_ratio_within = log_ratio - log_ratio.mean(-1, keepdim=True)
    beta_reward_hat = beta_reward_hat - beta_reward_hat.mean(-1, keepdim=True)    # 0 already unless r_hat is r
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


def loss_metrics(run: Run, batch: flowrl.Batch, update_log: flowrl.UpdateLog) -> dict:
    """loss_diagnostics summed over processes, as the means and root-mean-squares the study logs: the residual
    split (`residual_group_mean_rms`, `residual_within_rms` beside `beta_reward_hat_rms`), `log_ratio_within_rms`,
    `log_ratio_slope` and `log_z_target_mean`."""
    per_sequence = {name: values.cpu() for name, values in update_log.per_sequence.items()}
    totals = run.runtime.sum(loss_diagnostics(batch.rewards.cpu(), per_sequence["residual"], per_sequence["log_z"],
                                              batch.reward_hat.cpu(), run.cfg.beta, run.cfg.group_size))
    groups = totals.get("groups_in_loss", 0.0)
    sequences = groups * run.cfg.group_size

    def mean(name: str, count: float, root: bool = False) -> Optional[float]:
        value = totals.get(name, 0.0)
        return None if not count else math.sqrt(value / count) if root else value / count
    return {"residual_group_mean_rms": mean("residual_group_mean_sq", groups, root=True),
            "residual_within_rms": mean("residual_within_sq", sequences, root=True),
            "log_ratio_within_rms": mean("log_ratio_within_sq", sequences, root=True),
            "log_ratio_slope": mean("log_ratio_reward_cov", totals.get("beta_reward_hat_sq", 0.0)),
            "beta_reward_hat_rms": mean("beta_reward_hat_sq", sequences, root=True),
            "log_z_target_mean": mean("log_z_target", groups)}


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


class PickStudy(flowrl.Study):
    """What the loss did at each step, the coverage of its rollouts, and the answer distributions of fixed probe
    questions at every evaluation against step 0's (module docstring). `prompts` / `samples`: --answer-prompts /
    --answer-samples (None: the resumed run's, else 16 / 32)."""

    def __init__(self, prompts: Optional[int] = None, samples: Optional[int] = None):
        self.prompts, self.samples = prompts, samples
        self.step0_answers = None     # the step-0 model's: {"answers", "logprobs", "questions"}

    def settings(self) -> tuple[int, int]:
        return (16 if self.prompts is None else self.prompts), (32 if self.samples is None else self.samples)

    def probes(self, run: Run) -> dict[str, list[Problem]]:
        """The probe questions, the first of the (seed-independent) split: on the pick task every held-out question
        and as many training questions, of which the first --answer-prompts are also sampled; elsewhere those."""
        count = self.settings()[0]
        if count and exact(run):
            count = max(count, len(run.held_out))
        return {"held_out": run.held_out[:count], "train": run.train_problems[:count]}

    def step_metrics(self, run: Run, batch: flowrl.Batch, update_log: flowrl.UpdateLog) -> dict:
        metrics = loss_metrics(run, batch, update_log) if run.cfg.algo == "flowrl" else {}
        if exact(run):
            totals = run.runtime.sum(rollout_coverage(run, batch.problems, batch.rollouts.texts))
            metrics.update(distinct_correct_per_group=totals["distinct_correct"] / totals["groups"],
                           rare_correct_frac=(totals["rare_correct"] / totals["sequences"]
                                              if run.ref_model is not None else None))
        return metrics

    def evaluation_metrics(self, run: Run, step: int) -> dict:
        """On each list of probe questions: the sampled measures on the first --answer-prompts against the step-0
        answers, and on the pick task the exact ones on all. Every draw has its own seed: step 0's (run seed, 0,
        "step0/...", question), this step's (run seed, step, "answers/...", question). The first evaluation
        draws step 0's too; its own sample, a second draw of one model, is the KL's noise floor."""
        sampled, samples = self.settings()
        probes = self.probes(run)
        if not any(probes.values()):
            return {}
        runtime = run.runtime
        share = lambda problems: len(range(runtime.rank, min(len(problems), sampled), runtime.world_size))
        progress = tqdm(desc=f"answer distributions, step {step}", unit="batch", leave=False,
                        disable=not runtime.is_main, total=(1 if self.step0_answers is not None else 2) * sum(
                            -(-share(p) // flowrl.problems_per_call(samples, run.cfg)) for p in probes.values()))

        def answers_of(problems: list[Problem], seed_key: tuple) -> list[dict]:    # this process's share, gathered
            indices = list(range(runtime.rank, min(len(problems), sampled), runtime.world_size))
            return runtime.gather(sample_answers(run, problems, indices, samples, seed_key, progress))

        def logprobs_of(problems: list[Problem]) -> Optional[list[dict]]:
            return answer_logprobs(run.policy, run, problems) if exact(run) else None

        if self.step0_answers is None:
            self.step0_answers = {
                "answers": {name: answers_of(p, (run.cfg.seed, 0, f"step0/{name}")) for name, p in probes.items()},
                "logprobs": {name: logprobs_of(p) for name, p in probes.items()},
                "questions": question_lists(probes)}
        metrics = {}
        for name, problems in probes.items():
            counted = answers_of(problems, (run.cfg.seed, step, f"answers/{name}"))
            metrics.update(distribution_metrics(counted, self.step0_answers["answers"][name], name))
            metrics.update(target_metrics(self.step0_answers["answers"][name], run.cfg.beta, name))
            log_z = head_log_z(run, problems[:len(counted)])
            if log_z is not None:
                metrics.update(with_intervals({"log_z": log_z}, name))
            logprobs, step0_logprobs = logprobs_of(problems), self.step0_answers["logprobs"][name]
            if exact(run):
                metrics.update(exact_metrics(logprobs, step0_logprobs, name))
            if name == "train":
                metrics["histogram"] = {"question": problems[0].question, **counted[0]}
                if exact(run):
                    metrics["histogram"]["log_ratio"] = {a: logprobs[0][a] - step0_logprobs[0][a]
                                                         for a in logprobs[0]}
        progress.close()
        if runtime.is_main and metrics.get("histogram") and step in (0, run.cfg.steps):
            print_histogram(metrics["histogram"], run.cfg.temperature, step)
        return {**metrics, "answer_samples": samples}

    def state_dict(self) -> dict:
        prompts, samples = self.settings()
        return {"step0_answers": self.step0_answers, "answer_prompts": prompts, "answer_samples": samples}

    def load_state_dict(self, state: dict, run: Run) -> None:
        """The resumed run's settings where none were given, and its step-0 answers if they are of these questions
        (else the first evaluation after the resume draws them, and says so)."""
        self.prompts = state.get("answer_prompts") if self.prompts is None else self.prompts
        self.samples = state.get("answer_samples") if self.samples is None else self.samples
        self.step0_answers = state.get("step0_answers")
        if (self.step0_answers or {}).get("questions") != question_lists(self.probes(run)):
            self.step0_answers = None
            if run.runtime.is_main:
                print(f"note: {run.checkpoint} holds no step-0 answer distribution of these questions: KL to step 0 "
                      f"and the ratio spread will compare with the model at the first evaluation after step "
                      f"{run.start_step}")


def exact(run: Run) -> bool:
    """Whether the correct answers can be listed and scored exactly: the built-in pick task."""
    return run.cfg.task == "pick" and run.cfg.data is None


def question_lists(probes: dict) -> dict:
    return {name: [problem.question for problem in problems] for name, problems in probes.items()}


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Every other flag is flowrl.py's: python flowrl.py --help")
    parser.add_argument("--answer-prompts", type=int, help="probe questions of each split sampled at every "
                        "evaluation (pick: exact measures on every held-out one); default 16, or the resumed run's")
    parser.add_argument("--answer-samples", type=int, help="samples a probe question, at --temperature and top-p "
                        "1; default 32, or the resumed run's")
    args, flowrl_argv = parser.parse_known_args(argv)
    if args.answer_prompts is not None and args.answer_prompts < 0:
        parser.error(f"--answer-prompts {args.answer_prompts}: must be >= 0 (0: no answer distributions)")
    if args.answer_samples is not None and args.answer_samples < 2:
        parser.error(f"--answer-samples {args.answer_samples}: must be >= 2")
    flowrl.main(flowrl_argv, PickStudy(args.answer_prompts, args.answer_samples))


if __name__ == "__main__":
    main()
