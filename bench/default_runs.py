"""The default run's table from run folders: held-out greedy accuracy before and after, the gain, wall time.

    python bench/default_runs.py runs/flowrl-seed0 runs/flowrl-seed1 ... [--wall LOG ...]

Each folder is a `python flowrl.py` run (its config.json and metrics.jsonl); `--wall` takes the logs of
`/usr/bin/time -f "wall %e s ..."`, in the folders' order, for the wall-clock column. Prints one markdown row a run
(algo, precision asked for, seed, step 0 -> last greedy accuracy, gain in points, evaluation and training seconds,
wall), then the mean and sample sd of the gains and of the last accuracy per (algo, precision).
"""
import argparse
import collections
import json
import os
import re
import statistics


def read(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    evaluations = [r for r in records if r["split"] == "eval"]
    training = [r for r in records if r["split"] == "train"]
    return {"algo": config["algo"], "precision": config["precision"], "seed": config["seed"],
            "before": evaluations[0]["greedy_accuracy"], "after": evaluations[-1]["greedy_accuracy"],
            "eval_s": sum(r["eval_seconds"] for r in evaluations), "train_s": sum(r["step_seconds"] for r in training)}


def wall_seconds(log: str):
    with open(log) as f:
        found = re.findall(r"wall ([\d.]+) s", f.read())
    return float(found[-1]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--wall", nargs="*", default=[])
    args = parser.parse_args()
    runs = [read(folder) for folder in args.folders]
    walls = [wall_seconds(log) for log in args.wall] + [None] * (len(runs) - len(args.wall))
    print("| algo | precision | seed | greedy accuracy, step 0 -> last | gain (points) | eval s | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    groups = collections.defaultdict(list)
    for run, wall in zip(runs, walls):
        gain = round(100 * (run["after"] - run["before"]))
        groups[(run["algo"], run["precision"])].append((gain, run["after"]))
        print(f"| {run['algo']} | {run['precision']} | {run['seed']} | {run['before']:.2f} -> {run['after']:.2f} | "
              f"{gain:+d} | {run['eval_s']:.0f} | {run['train_s']:.0f} | {'' if wall is None else f'{wall:.0f}'} |")
    print()
    for (algo, precision), values in groups.items():
        gains, afters = [v[0] for v in values], [v[1] for v in values]
        spread = lambda xs: f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
        print(f"{algo} {precision}: {len(values)} seeds, gain {statistics.mean(gains):.1f}{spread(gains)} points "
              f"(min {min(gains)}), last accuracy {statistics.mean(afters):.3f}{spread(afters)}")


if __name__ == "__main__":
    main()
