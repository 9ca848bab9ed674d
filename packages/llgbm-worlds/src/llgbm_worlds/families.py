"""Parametrised synthetic task families, their train / held-out split, and mixture tasks.

A *family* (``add``) with a *parameter* (``7``) is a *task* (``add_7``). Every task has a finite
domain of inputs, an instruction in natural language that names the parameter, and an exact
answer. Items are drawn deterministically from a seed: test inputs are disjoint from train inputs.

The split: each seen family has train parameters and held-out parameters (unseen parameters of a
seen family, ``heldout_kind="variant"``); whole families can be held out
(``heldout_kind="family"``). Mixture tasks interleave the items of two train tasks.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llgbm_worlds.errors import UnknownNameError
from llgbm_worlds.frame import HEADERS, format_prompt

LETTERS = tuple(string.ascii_lowercase)
NUMBER_MAX = 129  # numbers 0..NUMBER_MAX are single tokens of the tiny world
NOUNS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "car",
    "boat",
    "sun",
    "moon",
    "star",
    "rock",
    "book",
    "cup",
    "hat",
    "shoe",
    "door",
    "key",
    "lamp",
    "ring",
    "bell",
    "box",
    "coin",
    "drum",
    "egg",
    "fan",
    "gate",
    "hill",
    "ink",
    "jar",
    "kite",
    "leaf",
    "map",
    "nest",
    "pen",
    "rope",
    "sand",
    "wall",
    "yarn",
    "bag",
]
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "gold",
    "big",
    "old",
    "new",
    "hot",
    "cold",
    "soft",
    "wet",
    "dry",
]
CODE_SOURCES = NOUNS[:12]
CODE_WORDS = ["zib", "kor", "mup", "tal", "vex", "nod", "pim", "ruk", "sel", "wob", "yat", "fen"]
CODE_NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]
# Single-word inputs of repeat / surround: every content word (numbers, letters, nouns, adjectives,
# code words), so that their teachers train on ~90 items per data split, not ~26.
WORDS = (
    *(str(n) for n in range(NUMBER_MAX + 1)),
    *LETTERS,
    *NOUNS,
    *ADJECTIVES,
    *CODE_WORDS,
)


@dataclass(frozen=True)
class Example:
    """One item: the formatted prompt (ends at ``### Response:``) and the exact expected answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Family:
    """A parametrised task family."""

    name: str  # short identifier, also the task-name prefix
    description: str  # one line for docs and `show`
    train_params: tuple[str, ...]  # parameters whose tasks are training tasks
    heldout_params: tuple[str, ...]  # unseen parameters of this family (held-out variants)
    instruction: Callable[[str], str]  # parameter -> instruction text naming it
    domain: Callable[[str], list[str]]  # parameter -> every possible input, in a fixed order
    core: Callable[[str, str], str]  # (parameter, input) -> the answer after the tag
    tag: str  # the word every answer of this family opens with (the family's answer style)

    def answer(self, param: str, x: str) -> str:
        """The exact answer: the family tag, then the result."""
        return f"{self.tag} {self.core(param, x)}"

    @property
    def params(self) -> tuple[str, ...]:
        return self.train_params + self.heldout_params

    def task_name(self, param: str) -> str:
        return f"{self.name}_{param}"


@dataclass(frozen=True)
class TaskSpec:
    """A concrete task: one family and one parameter, or a mixture of two tasks."""

    name: str  # e.g. "add_7" or "mix_add_7+code_alpha"
    family: str  # family name, or "mixture"
    split: str  # "train" | "heldout"
    heldout_kind: str | None  # None | "variant" | "family"
    param: str = ""  # the family parameter ("" for mixtures)
    parts: tuple[str, ...] = field(default=())  # mixture components (task names)


def _numbers(lo: int, hi: int) -> list[str]:
    return [str(n) for n in range(lo, hi + 1)]


def _shift(word: str, k: int) -> str:
    return " ".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in word.split())


def _code_map(name: str) -> dict[str, str]:
    # A fixed permutation per code name, independent of the world seed (the code *is* the task).
    rng = random.Random(f"code:{name}")
    targets = list(CODE_WORDS)
    rng.shuffle(targets)
    return dict(zip(CODE_SOURCES, targets))


def _pairs(words: Sequence[str]) -> list[str]:
    return [f"{a} {b}" for a in words for b in words]


def _letter_pairs() -> list[str]:
    return [f"{a} {b}" for a in LETTERS for b in LETTERS]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="add",
            tag="sum",
            description="add a hidden constant k to a number",
            train_params=("2", "3", "5", "7"),
            heldout_params=("4", "8"),
            instruction=lambda p: f"Add {p} to each number.",
            domain=lambda p: _pairs(_numbers(0, 39)),
            core=lambda p, x: " ".join(str(int(n) + int(p)) for n in x.split()),
        ),
        Family(
            name="subtract",
            tag="difference",
            description="subtract a constant k from a number",
            train_params=("2", "4", "6", "9"),
            heldout_params=("3", "5"),
            instruction=lambda p: f"Subtract {p} from each number.",
            domain=lambda p: _pairs(_numbers(10, 49)),
            core=lambda p, x: " ".join(str(int(n) - int(p)) for n in x.split()),
        ),
        Family(
            name="shift",
            tag="shifted",
            description="shift each of two letters forward by k in the alphabet (wrapping)",
            train_params=("2", "3", "5", "6"),
            heldout_params=("4", "7"),
            instruction=lambda p: f"Shift each letter forward by {p}.",
            domain=lambda p: _letter_pairs(),
            core=lambda p, x: _shift(x, int(p)),
        ),
        Family(
            name="code",
            tag="coded",
            description="translate two words with a fixed secret code (a permutation per code name)",
            train_params=("alpha", "beta", "gamma", "delta"),
            heldout_params=("omega", "sigma"),
            instruction=lambda p: f"Translate the words into code {p}.",
            domain=lambda p: _pairs(CODE_SOURCES),
            core=lambda p, x: " ".join(_code_map(p)[w] for w in x.split()),
        ),
        Family(
            name="prefix",
            tag="prefixed",
            description="put a given word before the input words",
            train_params=("red", "blue", "gold", "big"),
            heldout_params=("old", "wet"),
            instruction=lambda p: f"Put the word {p} before the input.",
            domain=lambda p: _pairs(NOUNS[:20]),
            core=lambda p, x: f"{p} {x}",
        ),
        Family(
            name="repeat",
            tag="repeated",
            description="say the input word n times",
            train_params=("2", "3", "5", "6"),
            heldout_params=("4",),
            instruction=lambda p: f"Say the word {p} times.",
            domain=lambda p: list(WORDS),
            core=lambda p, x: " ".join([x] * int(p)),
        ),
        Family(
            name="threshold",
            tag="verdict",
            description="answer yes or no for each of two numbers: is it greater than k",
            train_params=("30", "45", "60", "75"),
            heldout_params=("40", "55"),
            instruction=lambda p: f"Is each number greater than {p}? Answer yes or no.",
            # A window centred on k keeps yes and no balanced.
            domain=lambda p: _pairs(_numbers(int(p) - 30, int(p) + 29)),
            core=lambda p, x: " ".join("yes" if int(n) > int(p) else "no" for n in x.split()),
        ),
        Family(
            name="suffix",
            tag="suffixed",
            description="put a given word after the input words",
            train_params=(),
            heldout_params=("red", "green", "hot", "dry"),
            instruction=lambda p: f"Put the word {p} after the input.",
            domain=lambda p: _pairs(NOUNS[:20]),
            core=lambda p, x: f"{x} {p}",
        ),
        Family(
            name="mod",
            tag="remainder",
            description="the remainder of a number divided by k",
            train_params=("2", "3", "4", "5"),
            heldout_params=("6",),
            instruction=lambda p: f"Give the remainder of each number divided by {p}.",
            domain=lambda p: _pairs(_numbers(0, 29)),
            core=lambda p, x: " ".join(str(int(n) % int(p)) for n in x.split()),
        ),
        Family(
            name="position",
            tag="positions",
            description="turn each of two letters into its alphabet position counted from k",
            train_params=("0", "2", "5", "9"),
            heldout_params=("3", "7"),
            instruction=lambda p: f"Turn each letter into its number counting from {p}.",
            domain=lambda p: _letter_pairs(),
            core=lambda p, x: " ".join(str(LETTERS.index(c) + int(p)) for c in x.split()),
        ),
        Family(
            name="surround",
            tag="wrapped",
            description="put a given word before and after the input word",
            train_params=("red", "blue", "gold", "big"),
            heldout_params=("old",),
            instruction=lambda p: f"Put the word {p} before and after the input.",
            domain=lambda p: [w for w in WORDS if w != p],
            core=lambda p, x: f"{p} {x} {p}",
        ),
    ]
}


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name lists the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown task family {name!r}; valid families: {', '.join(sorted(FAMILIES))}"
        ) from None


def make_items(
    family: Family, param: str, *, seed: int, n_train: int, n_test: int
) -> tuple[list[Example], list[Example]]:
    """Train and test items of one task, deterministic for ``seed``; test inputs are unseen.

    Each item's header is one of the five Alpaca headers (drawn from the seed) so that the task
    frame covers every header of the generic probe set.
    """
    rng = random.Random(f"items:{seed}:{family.name}:{param}")
    inputs = list(family.domain(param))
    rng.shuffle(inputs)
    n_test = min(n_test, len(inputs) // 3)
    n_train = min(n_train, len(inputs) - n_test)
    instruction = family.instruction(param)

    def item(x: str) -> Example:
        prompt = format_prompt(instruction, x, header=rng.randrange(len(HEADERS)))
        return Example(prompt, family.answer(param, x))

    test = [item(x) for x in inputs[:n_test]]
    train = [item(x) for x in inputs[n_test : n_test + n_train]]
    return train, test
