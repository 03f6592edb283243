"""What the log Z head's dropout masks do to the first update's gradient: a mask a row (the official code's) against
one a prompt (flowrl.py's) and none, on the rollouts of a run's first step.

    python bench/log_z_dropout.py --seed 1 --draws 4 [flowrl.py flags, e.g. --precision fp32]

The run's first step is drawn as flowrl.py draws it (its prompts, its rollouts, its fresh head), then Eq. 6 on the
whole batch is differentiated with the head in each of three modes, `--draws` dropout draws each: `row`, a mask a
row; `prompt`, one mask a prompt shared by its G rows; `none`, the head in eval mode. For each it prints the
gradient norms of the head and of the policy, the policy's split into what reaches it through the log-probs and
what reaches it through the head's input (the prompt's hidden states, not detached, as in the official code), the
cosine between the policy's whole gradient and its log-prob part, the sd of log Z within a group, and the share of
the clipped norm left to the policy (policy norm / total norm).
"""
import argparse
import logging
import math
import os
import sys
import tempfile

if __name__ == "__main__":    # before torch loads: flowrl.py's OpenMP setting for a run
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowrl  # noqa: E402
import torch  # noqa: E402


def first_step_batch(run: flowrl.Run):
    """Step 1's rollouts, rewards, r_hat and pi_ref log-probs, drawn as run_step and training_step draw them."""
    cfg = run.cfg
    torch.manual_seed(flowrl.derived_seed(cfg.seed, 1, "step", 0))
    problems = run.data_rng.sample(run.train_problems, cfg.prompts_per_step)
    prompts = [flowrl.format_prompt(run.tokenizer, p.question) for p in problems]
    with run.runtime.autocast():
        rollouts = flowrl.sample_completions(run.policy, run.tokenizer, prompts, cfg.group_size, cfg.max_new_tokens)
    rewards = flowrl.rewards_of(rollouts.texts, problems, cfg.group_size, run.reward_fn)
    reward_hat = flowrl.reward_hat_of(rewards, cfg.group_size, cfg.reward_normalization)
    passes = flowrl.forward_passes(torch.arange(len(problems)), cfg.group_size, cfg.micro_batch_size)
    ref_logprobs = flowrl.batched_token_logprobs(run.ref_model, rollouts, cfg.temperature, passes, run.runtime)
    return rollouts, rewards, reward_hat, ref_logprobs


def gradients(run: flowrl.Run, batch, mode: str, path: str, draw: int):
    """(policy gradient, flattened; head gradient norm; mean sd of log Z within a group) of Eq. 6 on the batch.
    mode: row, prompt or none; path: all, logprob (the head's input detached) or head (the log-probs detached)."""
    rollouts, _, reward_hat, ref_logprobs = batch
    cfg, policy, head = run.cfg, run.policy, run.log_z_head
    G, P = cfg.group_size, rollouts.prompt_length
    torch.manual_seed(1000 + draw)
    policy.train()
    head.train(mode != "none")
    policy.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    with run.runtime.autocast():
        out = policy(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask, use_cache=False,
                     position_ids=flowrl.position_ids_from_mask(rollouts.attention_mask), output_hidden_states=True,
                     logits_to_keep=rollouts.completion_ids.shape[1] + 1)
        logprobs = flowrl.TokenLogprobs.apply(out.logits[:, :-1], rollouts.completion_ids, cfg.temperature)
        hidden = out.hidden_states[-1][:, :P]
        hidden = hidden.detach() if path == "logprob" else hidden
        mask = rollouts.attention_mask[:, :P]
        log_z = head(hidden[::G], mask[::G]).repeat_interleave(G) if mode == "prompt" else head(hidden, mask)
    logprobs = logprobs.detach() if path == "head" else logprobs
    loss, stats = flowrl.flowrl_loss(logprobs, ref_logprobs=ref_logprobs, old_logprobs=logprobs.detach(),
                                     log_z=log_z, reward_hat=reward_hat, completion_mask=rollouts.completion_mask,
                                     beta=cfg.beta, clip_eps=cfg.clip_eps, length_normalize=cfg.length_normalize)
    loss.backward()
    policy_gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                                 for p in policy.parameters()])
    head_norm = torch.cat([p.grad.double().flatten() for p in head.parameters()]).norm().item()
    return policy_gradient, head_norm, stats["log_z"].view(-1, G).std(-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=4, help="dropout draws a mode")
    args, flowrl_argv = parser.parse_known_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)      # as flowrl.main: symbols_equal has its own limit
    cfg = flowrl.config_from_argv([*flowrl_argv, "--output-dir", tempfile.mkdtemp(prefix="log_z_dropout_")])
    runtime = flowrl.start_runtime(cfg.device, cfg.precision)
    run = flowrl.start_run(cfg, runtime, flowrl.Study())
    batch = first_step_batch(run)
    print(f"seed {cfg.seed}, {runtime.precision}: rewards by group {batch[1].view(-1, cfg.group_size).tolist()}")
    print("| mode | draw | head grad norm | policy grad norm | through log-probs | through the head's input | "
          "cos(policy, log-prob part) | log Z sd in a group | policy's share of the clipped norm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("row", "prompt", "none"):
        for draw in range(args.draws if mode != "none" else 1):
            whole, head_norm, log_z_sd = gradients(run, batch, mode, "all", draw)
            through_logprobs = gradients(run, batch, mode, "logprob", draw)[0]
            through_head = gradients(run, batch, mode, "head", draw)[0]
            cosine = (whole @ through_logprobs / (whole.norm() * through_logprobs.norm())).item()
            print(f"| {mode} | {draw} | {head_norm:.1f} | {whole.norm():.1f} | {through_logprobs.norm():.1f} | "
                  f"{through_head.norm():.1f} | {cosine:.3f} | {log_z_sd:.3f} | "
                  f"{whole.norm().item() / math.hypot(whole.norm().item(), head_norm):.2f} |", flush=True)


if __name__ == "__main__":
    main()
