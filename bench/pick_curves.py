"""The figures and tables of the `--task pick` studies (bench/README.md): how much of the spread of correct answers
each setting keeps while it learns, from the run folders' metrics.jsonl (an evaluation every --eval-every steps).

    python bench/pick_curves.py runs/* --save bench/explore_curves.json   # read run folders, keep their curves
    python bench/pick_curves.py bench/explore_curves.json --markdown      # tables from the kept curves
    python bench/pick_curves.py ... --figure bench/pick_curves.png --only "GRPO" "FlowRL beta 1"
    python bench/pick_curves.py ... --bands bench/finalists.png --only "GRPO, lr 0.0001" ...   # seed mean and range

--figure draws one line per setting and seed: validity, validity against the entropy of the correct answers
(sampled and exact) and the ratio spread, for held-out and training questions, and below them the training
diagnostics that explain the curves. --bands draws the mean over seeds as a line and their range as a band, against
steps: validity, exact entropy, ratio spread (held-out) and FlowRL's log-ratio slope. Prints, per run and as mean
+- sample std over seeds, the final evaluation (or, with --last N, the mean of the last N; with the run's 95%
interval over questions where it was logged), pass@k at step 0 and the end, and the target checks: the 80-step
study's against --baseline, and, with --explore-target, the exploration study's (a FlowRL setting against GRPO
with and without its exploration, the stronger on each measure). Needs matplotlib only for the figures.
"""
import re
import argparse
import collections
import json
import os

import numpy as np

SPLITS = ("held_out", "train")
METRICS = ("validity", "distinct_correct", "entropy", "exact_entropy", "kl_to_step0", "exact_kl_to_step0",
           "ratio_spread")
# the METRICS as one table cell: validity / distinct correct / entropy (exact) / KL to step 0 (exact) / ratio spread
CELL = "{} / {} / {} ({}) / {} ({}) / {}"
DIAGNOSTICS = ("reward_mean", "response_length_mean", "equal_reward_group_frac", "residual_group_mean_rms",
               "residual_within_rms", "beta_reward_hat_rms", "log_ratio_within_rms", "log_ratio_slope", "log_z_mean",
               "log_z_target_mean", "grad_norm_policy", "grad_norm_log_z", "rare_correct_frac",
               "distinct_correct_per_group", "truncated_frac", "step_seconds")


def log_ratio_diagnostics(folder: str, beta: float, group_size: int) -> dict:
    """{step: (log_ratio_within_rms, log_ratio_slope)} from a run's rollouts.jsonl (--log-rollouts), for runs made
    before flowrl.py logged them: Eq. 6's log-ratio term is residual - log Z + beta r_hat; within each group,
    its rms and its regression slope on beta r_hat (0: not moved towards the target, 1: at it)."""
    path = os.path.join(folder, "rollouts.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    by_step = collections.defaultdict(list)
    for row in rows:
        if row.get("residual") is not None:
            by_step[row["step"]].append((row["residual"] - row["log_z"] + beta * row["reward_hat"],
                                         beta * row["reward_hat"]))
    result = {}
    for step, pairs in by_step.items():
        log_ratio, beta_reward_hat = np.array(pairs).reshape(-1, group_size, 2).transpose(2, 0, 1)  # [groups, G]
        within = log_ratio - log_ratio.mean(1, keepdims=True)
        beta_reward_hat = beta_reward_hat - beta_reward_hat.mean(1, keepdims=True)   # 0 already unless r_hat is r
        spread = (beta_reward_hat ** 2).sum()
        result[step] = (float(np.sqrt((within ** 2).mean())),
                        float((within * beta_reward_hat).sum() / spread) if spread else None)
    return result


def setting_of(config: dict) -> str:
    """A setting's name from its run's config.json: what differs from the defaults of the pick experiment."""
    if config["algo"] == "grpo":
        parts = ["GRPO"]
    else:
        parts = [f"FlowRL beta {config['beta']:g}"]
        if not config.get("length_normalize", True):
            parts.append("no 1/|y|")
        normalization = config.get("reward_normalization", "std" if config.get("std_normalize", True) else "mean")
        parts += {"std": [], "mean": ["no std"], "none": ["reward itself"]}[normalization]
        if config.get("log_z", "head") != "head":
            parts.append(f"log Z {config['log_z']}")
    if config.get("skip_equal_groups"):
        parts.append("skip equal groups")
    if config.get("explore_temperature") is not None:
        parts.append(f"T {config['explore_temperature']:g}")
    if config["lr"] != 3e-5:
        parts.append(f"lr {config['lr']:g}")
    if config.get("updates_per_batch", 1) != 1:          # the study's runs made one update a rollout batch
        parts.append(f"{config['updates_per_batch']} updates a batch")
    return ", ".join(parts)


def read_run(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evaluations = [{"step": row["step"], **{f"{split}_{name}": row.get(f"{split}_{name}")
                                           for split in SPLITS for name in METRICS},
                    **{key: value for key, value in row.items() if key.startswith("pass@") or key.endswith(
                        ("_ci95", "_questions")) or key in ("eval_seconds", "greedy_accuracy")}}
                   for row in rows if row["split"] == "eval"]
    training = [{"step": row["step"], **{name: row.get(name) for name in DIAGNOSTICS}}
                for row in rows if row["split"] == "train"]
    if config["algo"] == "flowrl" and training and "log_ratio_slope" not in rows[-1]:
        from_rollouts = log_ratio_diagnostics(folder, config["beta"], config["group_size"])
        for row in training:
            row["log_ratio_within_rms"], row["log_ratio_slope"] = from_rollouts.get(row["step"], (None, None))
    seconds = sum(row.get("step_seconds", 0) + row.get("eval_seconds", 0) for row in rows)   # training and evaluation
    histograms = [row["histogram"] for row in rows if row["split"] == "eval" and row.get("histogram")]
    run = {"setting": setting_of(config), "seed": config["seed"], "evaluations": evaluations, "training": training,
           "seconds": seconds, "histograms": histograms[:1] + histograms[-1:]}
    wall = wall_seconds(folder)
    return {**run, "wall_seconds": wall} if wall is not None else run


def wall_seconds(folder: str):
    """The whole process's wall time, from the `/usr/bin/time -v` report at the end of the run's log (FOLDER.log) or
    the `/usr/bin/time -f "%e s wall"` lines of FOLDER/time.txt, if either is there; for a run resumed into the
    same file, the sum of its processes."""
    found = []
    log, short = os.path.normpath(folder) + ".log", os.path.join(folder, "time.txt")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            found = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", f.read())
    elif os.path.isfile(short):
        with open(short, errors="replace") as f:
            found = re.findall(r"^([\d.]+) s wall$", f.read(), re.M)
    seconds = [sum(float(part) * 60 ** i for i, part in enumerate(reversed(t.split(":")))) for t in found]
    return sum(seconds) if seconds else None


def read(paths: list[str]) -> dict:
    runs = {}
    for path in paths:
        if os.path.isfile(path) and path.endswith(".json"):
            with open(path) as f:
                runs.update(json.load(f))
        elif os.path.isfile(os.path.join(path, "metrics.jsonl")):
            run = read_run(path)
            if run["evaluations"]:          # a run still at its first evaluation has nothing to show yet
                runs[os.path.basename(os.path.normpath(path))] = run
    return runs


def mean_of_last(runs: dict, last: int) -> dict:
    """The runs with their final evaluation replaced by the mean of their last `last` evaluations (a steadier end
    point: on this task one run's validity or ratio spread can move by 0.3 between two evaluations)."""
    if last == 1:
        return runs
    averaged = {}
    for name, run in runs.items():
        tail = run["evaluations"][-last:]
        mean = {key: float(np.mean([e[key] for e in tail])) if all(e[key] is not None for e in tail) else None
                for key in tail[-1] if key != "step"}
        averaged[name] = {**run, "evaluations": run["evaluations"][:-1] + [{"step": tail[-1]["step"], **mean}]}
    return averaged


def summary(runs: dict) -> None:
    """The final evaluation of each run, then mean +- sample std over the seeds of each setting."""
    by_setting = collections.defaultdict(list)
    for name, run in sorted(runs.items(), key=lambda item: (item[1]["setting"], item[1]["seed"])):
        by_setting[run["setting"]].append(run)
    for split in SPLITS:
        print(f"\n{split}: final step; validity / distinct correct / entropy (exact) / KL to step 0 (exact) / "
              f"ratio spread; step-0 KL is the noise floor")
        for setting, group in by_setting.items():
            for run in group:
                first, last = run["evaluations"][0], run["evaluations"][-1]
                values = [last[f"{split}_{name}"] for name in METRICS]
                print(f"  {setting:<55} seed {run['seed']} step {last['step']:>3}: "
                      + CELL.format(*[f"{value:.2f}" for value in values])
                      + f"   floor {first[f'{split}_kl_to_step0']:.2f}, {run.get('seconds', 0):.0f} s")
            if len(group) > 1:
                finals = {run["seed"]: run["evaluations"][-1] for run in group}
                print(f"  {setting:<55} mean +- std over {len(group)}: " + " | ".join(
                    "{} {:.2f} +- {:.2f}".format(name, *mean_std(finals, f"{split}_{name}")) for name in METRICS))


def markdown(runs: dict) -> None:
    """The final evaluation of each run as a markdown table (the README's): held-out, then training questions."""
    print("\n| setting | seed | held-out validity / distinct correct / entropy (exact) / KL to step 0 (exact) / ratio "
          "spread | training questions, the same | s |\n|---|---|---|---|---|")
    for name, run in sorted(runs.items(), key=lambda item: (not item[1]["setting"].startswith("GRPO"),
                                                             item[1]["setting"], item[1]["seed"])):
        last = run["evaluations"][-1]
        cells = [CELL.format(*[f"{last[f'{split}_{metric}']:.2f}" for metric in METRICS]) for split in SPLITS]
        setting = run["setting"].replace("|", "\\|")
        print(f"| {setting} | {run['seed']} | {cells[0]} | {cells[1]} | {run.get('seconds', 0):.0f} |")


def by_setting_finals(runs: dict) -> dict:
    """{setting: {seed: final evaluation}} for the settings run on more than one seed."""
    finals = collections.defaultdict(dict)
    for run in runs.values():
        finals[run["setting"]][run["seed"]] = run["evaluations"][-1]
    return {setting: seeds for setting, seeds in finals.items() if len(seeds) > 1}


def mean_std(finals: dict, key: str) -> tuple[float, float]:
    values = np.array([final[key] for final in finals.values()], dtype=float)
    return float(values.mean()), float(values.std(ddof=1))


def seed_means(runs: dict, baseline: str) -> None:
    """Mean +- sample std over seeds of the final evaluation, as a markdown table, and the study's target for every
    FlowRL setting against the baseline, on the seeds both were run on: validity >= the baseline's mean - 1 std,
    entropy >= 1.5x the baseline's (sampled and exact), ratio spread <= 0.5x the baseline's, on both splits."""
    finals = by_setting_finals(runs)
    if not finals:
        return
    print("\n| setting | seeds | held-out: validity / distinct correct / entropy (exact) / KL to step 0 (exact) / "
          "ratio spread, mean ± std | training questions, the same |\n|---|---|---|---|")
    for setting, seeds in sorted(finals.items(), key=lambda item: (not item[0].startswith("GRPO"), item[0])):
        cells = [CELL.format(*["{:.2f} ± {:.2f}".format(*mean_std(seeds, f"{split}_{metric}")) for metric in METRICS])
                 for split in SPLITS]
        print(f"| {setting.replace('|', chr(92) + '|')} | {', '.join(map(str, sorted(seeds)))} | {cells[0]} | "
              f"{cells[1]} |")
    if baseline not in finals:
        return
    print(f"\ntarget against {baseline}, on the seeds both have: validity (>= mean - std) / entropy (>= 1.5x) / "
          "exact entropy / ratio spread (<= 0.5x), each as the setting's mean against the baseline's")
    for setting, seeds in sorted(finals.items()):
        common = sorted(set(seeds) & set(finals[baseline]))
        if setting.startswith("GRPO") or len(common) < 2:
            continue
        ours, base = {seed: seeds[seed] for seed in common}, {seed: finals[baseline][seed] for seed in common}
        met, cells = True, []
        for split in SPLITS:
            validity = mean_std(ours, f"{split}_validity")[0]
            base_validity, base_std = mean_std(base, f"{split}_validity")
            ratios = {metric: mean_std(ours, f"{split}_{metric}")[0] / mean_std(base, f"{split}_{metric}")[0]
                      for metric in ("entropy", "exact_entropy", "ratio_spread")}
            passed = (validity >= base_validity - base_std and ratios["entropy"] >= 1.5
                      and ratios["exact_entropy"] >= 1.5 and ratios["ratio_spread"] <= 0.5)
            met = met and passed
            cells.append(f"{split} {validity:.2f} vs {base_validity - base_std:.2f} / {ratios['entropy']:.2f}x / "
                         f"{ratios['exact_entropy']:.2f}x / {ratios['ratio_spread']:.2f}x")
        print(f"  {setting:<55} seeds {common}: " + "; ".join(cells) + ("   met" if met else "   not met"))


INTERVAL_METRICS = ("validity", "exact_kl_to_step0", "ratio_spread", "exact_entropy")


def with_interval(evaluation: dict, key: str) -> str:
    value, interval = evaluation.get(key), evaluation.get(f"{key}_ci95")
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {interval:.2f}" if interval is not None else "")


def interval_table(runs: dict) -> None:
    """Each run's final evaluation with its 95% interval over questions: validity / exact KL to step 0 / ratio
    spread / exact entropy, held-out then training questions, and the run's wall time (the whole process)."""
    print("\n| setting | seed | held-out: validity / exact KL to step 0 / ratio spread / exact entropy (± 95% over "
          "questions) | training questions, the same | questions (sampled, exact) | wall time |\n|---|---|---|---|---|---|")
    for name, run in sorted(runs.items(), key=lambda item: (not item[1]["setting"].startswith("GRPO"),
                                                             item[1]["setting"], item[1]["seed"])):
        last = run["evaluations"][-1]
        cells = [" / ".join(with_interval(last, f"{split}_{metric}") for metric in INTERVAL_METRICS) for split in SPLITS]
        counts = f"{last.get('held_out_sampled_questions', '-')}, {last.get('held_out_exact_questions', '-')}"
        wall = run.get("wall_seconds")
        print(f"| {run['setting'].replace('|', chr(92) + '|')} | {run['seed']} | {cells[0]} | {cells[1]} | {counts} | "
              + (f"{wall / 60:.0f} min |" if wall else "- |"))


def pass_at_k_table(runs: dict) -> None:
    """Held-out pass@k at step 0 and at the last evaluation of each run (the unbiased estimator from n samples)."""
    ks = sorted({int(key.split("@")[1]) for run in runs.values() for e in run["evaluations"] for key in e
                 if key.startswith("pass@")})
    if not ks:
        return
    print("\n| setting | seed | " + " | ".join(f"pass@{k}" for k in ks) + " |\n|---|---|" + "---|" * len(ks))
    first = next(iter(runs.values()))["evaluations"][0]
    print("| step 0 | | " + " | ".join(f"{first.get(f'pass@{k}', float('nan')):.2f}" for k in ks) + " |")
    for name, run in sorted(runs.items(), key=lambda item: (not item[1]["setting"].startswith("GRPO"),
                                                             item[1]["setting"], item[1]["seed"])):
        last = run["evaluations"][-1]
        print(f"| {run['setting'].replace('|', chr(92) + '|')} | {run['seed']} | "
              + " | ".join(f"{last[f'pass@{k}']:.2f}" if last.get(f"pass@{k}") is not None else "-" for k in ks) + " |")


def explore_target(runs: dict, grpo: str = "GRPO, lr 0.0001") -> None:
    """The exploration study's target, for each FlowRL setting against GRPO at lr 1e-4 with and without the same
    exploration (the stronger of the two on each measure), on the seeds all three share, held-out and training
    questions: validity >= the stronger GRPO's mean - 1 sd, exact KL to step 0 and ratio spread each <= 0.5x the
    stronger (lower) GRPO's mean."""
    finals = by_setting_finals(runs)
    for setting, seeds in sorted(finals.items()):
        if setting.startswith("GRPO"):
            continue
        temperature = re.search(r", T ([\d.]+)", setting)
        rivals = [grpo] + ([f"GRPO, T {temperature.group(1)}, lr 0.0001"] if temperature else [])
        rivals = [r for r in rivals if r in finals]
        common = sorted(set(seeds).intersection(*[finals[r] for r in rivals])) if rivals else []
        if len(common) < 2:
            continue
        pick = lambda table: {seed: table[seed] for seed in common}
        cells, met = [], True
        for split in SPLITS:
            validity = mean_std(pick(seeds), f"{split}_validity")[0]
            strongest = max(rivals, key=lambda r: mean_std(pick(finals[r]), f"{split}_validity")[0])
            bar = np.subtract(*mean_std(pick(finals[strongest]), f"{split}_validity"))
            ratios = {m: mean_std(pick(seeds), f"{split}_{m}")[0] / min(mean_std(pick(finals[r]), f"{split}_{m}")[0]
                                                                        for r in rivals)
                      for m in ("exact_kl_to_step0", "ratio_spread")}
            passed = validity >= bar and all(ratio <= 0.5 for ratio in ratios.values())
            met = met and passed
            cells.append(f"{split}: validity {validity:.2f} vs {bar:.2f}, exact KL {ratios['exact_kl_to_step0']:.2f}x, "
                         f"ratio spread {ratios['ratio_spread']:.2f}x")
        print(f"  {setting} against {' / '.join(rivals)}, seeds {common}: " + "; ".join(cells)
              + ("   met" if met else "   not met"))


def histograms(runs: dict) -> None:
    """One training question's 64 answers at step 0 and at the last evaluation of each seed-0 run, with the exact
    log-ratio to pi_ref of each correct bare answer in brackets."""
    ordered = sorted((run for run in runs.values() if run.get("histograms") and run["seed"] == 0),
                     key=lambda run: (not run["setting"].startswith("GRPO"), run["setting"], run["seed"]))
    if not ordered:
        return
    first = ordered[0]["histograms"][0]
    columns = [("step 0", first)] + [(f"{run['setting']} (seed {run['seed']})", run["histograms"][-1])
                                     for run in ordered]
    print(f'\n"{first["question"]}"   * = correct')
    answers = sorted({a for _, h in columns for a in h["answers"]},
                     key=lambda a: (a not in first["log_ratio"], -sum(h["answers"].get(a, 0) for _, h in columns), a))
    for label, _ in columns:
        print(f"  {label}")
    for answer in answers[:10]:
        cells = []
        for _, h in columns:
            count = h["answers"].get(answer, 0)
            ratio = h["log_ratio"].get(answer)
            cells.append(f"{count}" + (f" ({ratio:+.1f})" if ratio is not None and h is not first else ""))
        print(f"  {('*' if answer in first['log_ratio'] else ' ') + answer:<13}" + "".join(f"{c:>14}" for c in cells))


def diagnostics(runs: dict, window: int = 10) -> None:
    """The training records' loss diagnostics, averaged over windows of steps: is the loss matching its target
    (residual within groups small against beta * r_hat) or still far from it (the two equal: a policy gradient)?"""
    print(f"\ntraining diagnostics, means over {window} steps: reward / length / equal-reward groups / "
          "residual within groups : beta r_hat (rms) / log-ratio within groups (rms), its slope on beta r_hat / "
          "residual's group mean (rms) / log Z - its target / grad norm policy (log Z head) / rare correct "
          "rollouts, distinct correct per group")
    for name, run in sorted(runs.items(), key=lambda item: (item[1]["setting"], item[1]["seed"])):
        print(f"  {run['setting']} (seed {run['seed']})")
        rows = run["training"]
        for start in range(0, len(rows), window):
            chunk = rows[start:start + window]

            def mean(key):
                values = [row[key] for row in chunk if row.get(key) is not None]
                return float(np.mean(values)) if values else float("nan")
            policy_norm, head_norm = mean("grad_norm_policy"), mean("grad_norm_log_z")
            norms = ("no update (every group's rewards equal, and left out)" if np.isnan(policy_norm) else
                     f"{policy_norm:6.2f} ({'no head' if np.isnan(head_norm) else f'{head_norm:.2f}'})")
            print(f"    steps {chunk[0]['step']:>3}-{chunk[-1]['step']:<3} {mean('reward_mean'):.2f} / "
                  f"{mean('response_length_mean'):4.1f} / {mean('equal_reward_group_frac'):.2f} / "
                  f"{mean('residual_within_rms'):5.2f} : {mean('beta_reward_hat_rms'):5.2f} / "
                  f"{mean('log_ratio_within_rms'):5.2f}, {mean('log_ratio_slope'):+5.2f} / "
                  f"{mean('residual_group_mean_rms'):5.2f} / {mean('log_z_mean') - mean('log_z_target_mean'):+6.2f} / "
                  f"{norms} / {mean('rare_correct_frac'):.3f}, {mean('distinct_correct_per_group'):.2f}")


def training_value(row: dict, key: str):
    """A training record's value; "pull_ratio" is the rms log-ratio within groups over the rms of beta r_hat."""
    if key == "pull_ratio":
        within, reward = row.get("log_ratio_within_rms"), row.get("beta_reward_hat_rms")
        return within / reward if within is not None and reward else None
    return row.get(key)


def draw(runs: dict, path: str, only: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = sorted({run["setting"] for run in runs.values() if not only or run["setting"] in only},
                      key=lambda s: (not s.startswith("GRPO"), s))
    palette = plt.cm.tab10.colors + plt.cm.Dark2.colors
    if len(settings) > len(palette):
        raise SystemExit(f"{len(settings)} settings, {len(palette)} colours: pass --only to choose some")
    colours = dict(zip(settings, palette))
    styles = {0: "-", 1: "--", 2: ":"}
    figure, axes = plt.subplots(3, 4, figsize=(20, 14))
    for (name, run) in sorted(runs.items()):
        if run["setting"] not in colours:
            continue
        evaluations = [e for e in run["evaluations"] if e["held_out_validity"] is not None]
        style = dict(color=colours[run["setting"]], linestyle=styles.get(run["seed"], "-."), marker=".",
                     label=f"{run['setting']} (seed {run['seed']})")
        steps = [e["step"] for e in evaluations]
        for row, split in enumerate(SPLITS):
            validity = [e[f"{split}_validity"] for e in evaluations]
            axes[row, 0].plot(steps, validity, **style)
            for column, entropy in ((1, "entropy"), (2, "exact_entropy")):
                values = [e[f"{split}_{entropy}"] for e in evaluations]
                axes[row, column].plot(validity, values, **style)
                axes[row, column].plot(validity[-1], values[-1], marker="o", markersize=7, color=style["color"])
            axes[row, 3].plot(steps, [e[f"{split}_ratio_spread"] for e in evaluations], **style)
        training = run["training"]
        for column, key in enumerate(("log_ratio_slope", "pull_ratio", "response_length_mean",
                                      "equal_reward_group_frac")):
            values = [training_value(row, key) for row in training]
            window = [(row["step"], np.mean([v for v in values[max(0, i - 9):i + 1] if v is not None]))
                      for i, row in enumerate(training) if any(v is not None for v in values[max(0, i - 9):i + 1])]
            if window:
                axes[2, column].plot(*zip(*window), **{**style, "marker": None})
    for row, split in enumerate(SPLITS):
        label = split.replace("_", "-")
        axes[row, 0].set(xlabel="step", ylabel="validity (fraction of 64 samples correct)",
                         title=f"{label}: validity")
        axes[row, 1].set(xlabel=f"{label} validity", ylabel="entropy of the correct answers, sampled (nats)",
                         title=f"{label}: sampled entropy against validity")
        axes[row, 2].set(xlabel=f"{label} validity", ylabel="entropy over the correct bare answers, exact (nats)",
                         title=f"{label}: exact entropy against validity")
        axes[row, 3].set(xlabel="step", ylabel="std of log pi_theta/pi_ref over correct answers",
                         title=f"{label}: ratio spread (0: pi_ref's preferences kept)")
    axes[2, 0].set(xlabel="step", ylabel="slope of the log-ratio on beta r_hat within groups",
                   title="FlowRL: progress to Eq. 6's target (1: at it)")
    axes[2, 1].set(xlabel="step", ylabel="rms log-ratio within groups / rms beta r_hat", yscale="log", ylim=(0.05, 10),
                   title="FlowRL: pull to pi_ref / pull of the reward")
    axes[2, 2].set(xlabel="step", ylabel="tokens", title="training: mean response length (limit 12)")
    axes[2, 3].set(xlabel="step", ylabel="fraction of groups", title="training: groups whose rewards are all equal")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.suptitle("--task pick, SmolLM2-135M-Instruct: learning (up in the first column, right in the next two) "
                    "while keeping the spread (up in the middle two, down in the last);\na large dot marks the last "
                    "evaluation. Bottom row: training diagnostics, means over the last 10 steps")
    figure.tight_layout(rect=(0, 0.05, 1, 0.97))
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def label(setting: str) -> str:
    """A setting's name for a figure's legend, in words: "FlowRL beta 3, no 1/|y|, T 1.5" -> "FlowRL beta 3 without
    Eq. 6's 1/|y|, rollouts at T 1.5"; Eq. 6 unchanged at another beta than the paper's 15 says so.

    >>> label("FlowRL beta 15"), label("FlowRL beta 15, reward itself")
    ("FlowRL beta 15 (the paper's setting)", "FlowRL beta 15, the reward itself for Eq. 5's r_hat")
    """
    words = setting.replace(", no 1/|y|", " without Eq. 6's 1/|y|").replace(", no std", " without Eq. 5's std")
    words = words.replace(", reward itself", ", the reward itself for Eq. 5's r_hat")
    words = re.sub(r", T ([\d.]+)", r", rollouts at T \1", words).replace("lr 0.0001", "lr 1e-4")
    plain = words.startswith("FlowRL beta") and not any(change in words for change in ("without", "log Z", "skip",
                                                                                        "reward itself"))
    return words + ((" (the paper's setting)" if words.startswith("FlowRL beta 15") else " (Eq. 6; the paper's "
                     "beta is 15)") if plain else "")


def seed_bands(runs: list[dict], values) -> tuple[list, list, list, list]:
    """(steps, mean, low, high) over the runs of one setting, at the steps all of them have; values(run) gives a
    run's {step: value}."""
    series = [values(run) for run in runs]
    steps = sorted(set.intersection(*[set(s) for s in series])) if series else []
    table = np.array([[s[step] for step in steps] for s in series], dtype=float)
    return steps, table.mean(0), table.min(0), table.max(0)


def draw_bands(runs: dict, path: str, only: list[str], title: str) -> None:
    """The chosen settings, each as the mean over its seeds (line) and their range (band), against steps:
    held-out validity, exact entropy and ratio spread, and FlowRL's log-ratio slope on beta r_hat (10-step means)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = only or sorted({run["setting"] for run in runs.values()})
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.8))

    def evaluated(key):
        return lambda run: {e["step"]: e[key] for e in run["evaluations"] if e.get(key) is not None}

    def slope(run):
        rows = run["training"]
        window = {}
        for i, row in enumerate(rows):
            values = [r["log_ratio_slope"] for r in rows[max(0, i - 9):i + 1] if r.get("log_ratio_slope") is not None]
            if (i + 1) % 10 == 0 and values:
                window[row["step"]] = float(np.mean(values))
        return window
    panels = [(evaluated("held_out_validity"), "held-out validity (fraction of samples correct)"),
              (evaluated("held_out_exact_entropy"), "held-out exact entropy over the correct answers (nats)"),
              (evaluated("held_out_ratio_spread"), "held-out ratio spread (0: pi_ref's preferences kept)"),
              (slope, "FlowRL: slope of the log-ratio on beta r_hat (1: at Eq. 6's target)")]
    for colour, setting in zip(plt.cm.tab10.colors, settings):
        group = [run for run in runs.values() if run["setting"] == setting]
        seeds = sorted(run["seed"] for run in group)
        for axis, (values, heading) in zip(axes, panels):
            steps, mean, low, high = seed_bands(group, values)
            if not steps:
                continue
            seed_list = ", ".join(map(str, seeds))
            name = f"{label(setting)} (seed{'s' * (len(seeds) > 1)} {seed_list})"
            axis.plot(steps, mean, color=colour, marker=".", label=name)
            axis.fill_between(steps, low, high, color=colour, alpha=0.15)
            axis.set(xlabel="step", title=heading)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.title.set_fontsize(10)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.12, 1, 0.94))
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders (with metrics.jsonl and config.json) or kept .json")
    parser.add_argument("--save", help="keep the runs' curves in this .json (about 60 kB a run)")
    parser.add_argument("--figure", help="draw the figure into this image file")
    parser.add_argument("--only", nargs="*", default=[], help="settings to draw (all by default)")
    parser.add_argument("--bands", help="draw the --only settings' seed means and ranges into this image file")
    parser.add_argument("--title", default="--task pick, SmolLM2-135M-Instruct: the mean over seeds (line) and "
                        "their range (band)", help="the --bands figure's title")
    parser.add_argument("--explore-target", action="store_true", help="also check the exploration study's target")
    parser.add_argument("--diagnostics", action="store_true", help="also print the training runs' loss diagnostics")
    parser.add_argument("--markdown", action="store_true", help="also print the final evaluations as markdown tables")
    parser.add_argument("--last", type=int, default=1,
                        help="print the mean of each run's last N evaluations instead of its final one (the figure "
                             "is unchanged)")
    parser.add_argument("--baseline", default="GRPO, lr 0.0001",
                        help="the setting the target compares every other setting with (same seeds)")
    args = parser.parse_args()
    runs = read(args.paths)
    if not runs:
        raise SystemExit("no runs found: give run folders holding metrics.jsonl and config.json, or a kept .json")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(runs, f, indent=1)
    finals = mean_of_last(runs, args.last)
    if args.last > 1:
        print(f"final values below: means of each run's last {args.last} evaluations")
    summary(finals)
    if args.markdown:
        markdown(finals)
        interval_table(finals)
        pass_at_k_table(runs)
        seed_means(finals, args.baseline)
        histograms(runs)
    if args.explore_target:
        print("\nexploration target (80 steps, seeds 0-2, held-out and training questions):")
        explore_target(finals, args.baseline)
    if args.diagnostics:
        diagnostics(runs)
    if args.figure:
        draw(runs, args.figure, args.only)
    if args.bands:
        draw_bands(runs, args.bands, args.only, args.title)


if __name__ == "__main__":
    main()
