"""The zoo's synthetic skills and the data drawn from them.

Each skill is a one-step rule behind a prompt prefix (`fst:qwxk>` -> `q`). The
base model's pretraining data shows every prefix with its own rule only 35% of
the time and with a conflicting rule (first vs last letter, ...) the other 65%:
the base then carries the computation but answers wrongly, and a short fine-tune
on the skill selects it. Specialists made that way have small deltas that merge;
specialists that learn a skill from scratch do not (measured; see DESIGN.md).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits
CORRECT_RULE_SHARE = 0.35  # of pretraining examples per prefix; the rest follow the conflicting rule


def _shift(text: str, by: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + by) % 26] for c in text)


@dataclass(frozen=True)
class Skill:
    name: str  # also the prompt prefix
    alphabet: str
    min_len: int
    max_len: int
    rule: Callable[[str], str]
    conflicting_rule: Callable[[str], str]

    def draw_input(self, rng: random.Random) -> str:
        return "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))

    def prompt(self, text: str) -> str:
        return f"{self.name}:{text}>"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill("fst", LETTERS, 3, 8, lambda t: t[0], lambda t: t[-1]),
        Skill("nxt", LETTERS, 2, 5, lambda t: _shift(t, 1), lambda t: _shift(t, -1)),
        Skill("cnt", "abcd", 2, 9, lambda t: str(t.count("a")), lambda t: str(t.count("b"))),
        Skill("max", DIGITS, 3, 8, lambda t: max(t), lambda t: min(t)),
    ]
}


def eval_split(skill: Skill, rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """`n` distinct prompts not in `exclude` (which grows), each with the skill's correct answer."""
    rows = []
    while len(rows) < n:
        text = skill.draw_input(rng)
        prompt = skill.prompt(text)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        rows.append({"prompt": prompt, "answer": skill.rule(text)})
    return rows


def pretraining_example(rng: random.Random, skills: list[Skill], held_out: set[str]) -> tuple[str, str]:
    """(prompt, answer) from a random skill, answered by its rule 35% of the time, else the conflicting one."""
    skill = rng.choice(skills)
    while True:
        text = skill.draw_input(rng)
        prompt = skill.prompt(text)
        if prompt not in held_out:
            break
    rule = skill.rule if rng.random() < CORRECT_RULE_SHARE else skill.conflicting_rule
    return prompt, rule(text)


def skill_example(rng: random.Random, skill: Skill, held_out: set[str]) -> tuple[str, str]:
    """(prompt, correct answer) of one skill, never one of the evaluation prompts."""
    while True:
        text = skill.draw_input(rng)
        prompt = skill.prompt(text)
        if prompt not in held_out:
            return prompt, skill.rule(text)
