"""The workload both benchmark scripts time, defined once: their flags and their questions."""
import argparse
import random


def arguments(description: str) -> argparse.ArgumentParser:
    """-P prompts a step, -G samples per prompt, -M new tokens per completion, -S steps (the first warms up)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-P", "--prompts-per-step", type=int, default=4)
    parser.add_argument("-G", "--group-size", type=int, default=8)
    parser.add_argument("-M", "--new-tokens", type=int, default=64)
    parser.add_argument("-S", "--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def addition_questions(count: int, seed: int) -> list[tuple[str, int]]:
    """("What is a + b?", a + b) with a, b drawn from 10..99 by random.Random(seed)."""
    rng = random.Random(seed)
    questions = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        questions.append((f"What is {a} + {b}?", a + b))
    return questions
