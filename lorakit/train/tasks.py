"""Built-in tasks: generated from a seed, scored by exact match on a held-out split.

Each task is a small, unambiguous rewrite that a 135M chat model gets mostly wrong out of the box
and a LoRA adapter learns in minutes:

  * ``date``:    a date written in one of several English styles → ISO 8601 (``2021-03-05``);
  * ``extract``: a sentence about a person → ``name=…; age=…; city=…``.

The eval split is drawn first and the training split never contains one of its prompts.
"""

from __future__ import annotations

import calendar
import datetime
import random
from dataclasses import dataclass
from typing import Callable

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One prompt (a user message) and the exact completion expected."""

    prompt: str
    completion: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]


def _date(rng: random.Random) -> Example:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(100 * 365))
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    suffix = "th" if 11 <= day.day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day.day % 10, "th")
    styles = [f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", f"{short} {day.day}, {day.year}",
              f"{day.day} {short} {day.year}", f"{month} {day.day}{suffix}, {day.year}",
              f"{calendar.day_name[day.weekday()]}, {month} {day.day}, {day.year}",
              f"the {day.day}{suffix} of {month} {day.year}"]
    text = rng.choice(styles)
    return Example(f"Convert this date to ISO format (YYYY-MM-DD): {text}", day.isoformat())


_FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
          "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
_LAST = ["Smith", "Okafor", "Garcia", "Novak", "Tanaka", "Müller", "Rossi", "Haddad", "Kowalski", "Silva",
         "Nguyen", "Larsen", "Dubois", "Ivanova", "Mensah", "Patel", "Costa", "Berg", "Kim", "Moreau"]
_CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Porto", "Dublin", "Hanoi", "Nairobi",
           "Krakow", "Austin", "Seville", "Bergen", "Busan", "Tunis", "Leeds", "Graz", "Perth"]


def _extract(rng: random.Random) -> Example:
    name, age, city = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", rng.randrange(18, 90), rng.choice(_CITIES)
    sentence = rng.choice([
        f"{name}, aged {age}, lives in {city}.",
        f"Meet {name} from {city}, who is {age} years old.",
        f"In {city}, {name} ({age}) runs a small bakery.",
        f"{name} is {age} and moved to {city} last year.",
        f"Our new colleague {name}, {age}, joins the {city} office.",
    ])
    return Example(f"Extract the person as 'name=<name>; age=<age>; city=<city>': {sentence}",
                   f"name={name}; age={age}; city={city}")


TASKS: dict[str, Callable[[random.Random], Example]] = {"date": _date, "extract": _extract}


def split(task: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples of ``task``: deterministic in ``seed``, no eval prompt in train."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    make, rng = TASKS[task], random.Random(f"{task}:{seed}")
    evaluation, seen = [], set()
    while len(evaluation) < n_eval:
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            evaluation.append(example)
    train, attempts = [], 0
    while len(train) < n_train:
        example, attempts = make(rng), attempts + 1
        if attempts > 100 * (n_train + n_eval):
            raise ConfigError(f"task {task!r} cannot make {n_train} training examples distinct from its eval set")
        if example.prompt not in seen:
            seen.add(example.prompt)
            train.append(example)
    return train, evaluation


def exact_match(prediction: str, target: str) -> bool:
    """The score: the answer, stripped of surrounding whitespace, equals the target."""
    return prediction.strip() == target.strip()
