"""Probe sets: the fixed prompts whose activations embed an adapter.

`generic_probes()` is the Delta Activations paper's set, verbatim. `domain_probes()` gives
five prompts per domain in the same Alpaca frame, and `load_probes()` reads a set from a file.
Every set has a stable content hash (`ProbeSet.hash`) that keys cached deltas.

File formats read by `load_probes`:
- `.json`: a list of strings, or an object `{"name": str, "probes": [str, ...]}`.
- `.txt` (any other suffix): probes separated by lines holding exactly `---`. Probes may
  contain blank lines (the Alpaca frame does), which is why a blank line is not a separator.
  Newlines at the start and end of each block are dropped; everything else is kept verbatim.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llgbm_delta.errors import ProbeError

# The paper's frame: a header, then the instruction and input, ending where a tuned model answers.
# There is deliberately no space after "Input:" (the paper's probes read "Input:Input.").
PROBE_FRAME = "{header}\n\n### Instruction:\n{task} Input:{input}\n\n### Response:"

GENERIC_HEADERS = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "The task described below requires a response that completes the request accurately.",
    "Below is a description of a task. Provide a response that aligns with the requirements.",
    "The following instruction outlines a task. Generate a response that meets the specified "
    "request.",
    "You are given an instruction and input. Write a response that completes the task as "
    "requested.",
)
GENERIC_TASK = "Please provide a response."
GENERIC_INPUT = "Input."

# (task, input) pairs per domain; each pair goes under the generic header of the same index.
_DOMAIN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "math": (
        ("Solve the arithmetic problem and give the final number.", "What is 17 plus 25?"),
        (
            "Compute the result step by step.",
            "A box holds 12 apples. How many apples are in 4 boxes?",
        ),
        ("Find the value of x.", "3x + 5 = 20"),
        (
            "Answer the word problem with a number.",
            "Tom has 9 coins and spends 4. How many are left?",
        ),
        ("Simplify the fraction.", "18/24"),
    ),
    "code": (
        ("Write a Python function for the request.", "Return the sum of a list of integers."),
        ("Explain what the code does.", "print(sorted(set([3, 1, 3, 2])))"),
        ("Fix the bug in the function.", "def square(x): return x * 2"),
        ("Write a SQL query for the request.", "Count the rows of the table users."),
        ("Give the output of the program.", "for i in range(3): print(i * i)"),
    ),
    "commonsense": (
        (
            "Choose the more plausible answer.",
            "Where do people usually keep milk? A) fridge B) oven",
        ),
        ("Answer the question with yes or no.", "Can a fish climb a tree?"),
        ("Complete the sentence sensibly.", "She opened the umbrella because"),
        ("Pick the correct option.", "What do you use to cut paper? A) scissors B) spoon"),
        ("Answer the question briefly.", "What happens to ice when it is left in the sun?"),
    ),
}
DOMAINS = tuple(_DOMAIN_PAIRS)


def format_probe(header: str, task: str, input: str) -> str:
    """One probe in the paper's frame."""
    return PROBE_FRAME.format(header=header, task=task, input=input)


@dataclass(frozen=True)
class ProbeSet:
    """A named, ordered set of probe texts."""

    name: str  # a label for humans; not part of the hash
    texts: tuple[str, ...]  # the probe prompts, fed to the tokenizer verbatim

    def __post_init__(self) -> None:
        if not isinstance(self.texts, tuple):
            object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ProbeError(f"probe set {self.name!r}: no probes")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise ProbeError(f"probe set {self.name!r}: probe {i} is empty or not a string")

    @property
    def hash(self) -> str:
        """sha256 over the texts (JSON-encoded list, UTF-8); the name does not count."""
        blob = json.dumps(list(self.texts), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.texts)


def generic_probes() -> ProbeSet:
    """The five generic probes of Delta Activations (Xu et al., 2025), verbatim and in order."""
    return ProbeSet(
        "generic", tuple(format_probe(h, GENERIC_TASK, GENERIC_INPUT) for h in GENERIC_HEADERS)
    )


def domain_probes(domain: str) -> ProbeSet:
    """Five probes for `domain` ("math", "code" or "commonsense") in the generic frame."""
    if domain not in _DOMAIN_PAIRS:
        raise ProbeError(f"unknown probe domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    pairs = _DOMAIN_PAIRS[domain]
    return ProbeSet(
        domain, tuple(format_probe(h, t, x) for h, (t, x) in zip(GENERIC_HEADERS, pairs))
    )


def load_probes(path: str | Path) -> ProbeSet:
    """Read a probe set from a `.json` or text file (formats in the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeError(f"{path}: probe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: cannot read probe file ({e})") from None
    if not raw.strip():
        raise ProbeError(f"{path}: probe file is empty")
    if path.suffix.lower() == ".json":
        return _parse_json(path, raw)
    blocks = _split_blocks(raw)
    if not blocks:
        raise ProbeError(f"{path}: no probes")
    for i, block in enumerate(blocks):
        if not block.strip():
            raise ProbeError(f"{path}: probe {i} (between '---' lines) is empty")
    return ProbeSet(path.stem, tuple(blocks))


def resolve_probes(name_or_path: str | Path | ProbeSet | None) -> ProbeSet:
    """`None`/"generic", a domain name, a file path, or a ProbeSet as is."""
    if isinstance(name_or_path, ProbeSet):
        return name_or_path
    if name_or_path is None or name_or_path == "generic":
        return generic_probes()
    if isinstance(name_or_path, str) and name_or_path in _DOMAIN_PAIRS:
        return domain_probes(name_or_path)
    return load_probes(name_or_path)


def _split_blocks(raw: str) -> list[str]:
    blocks, current = [], []
    for line in raw.splitlines(keepends=True):
        if line.rstrip("\r\n") == "---":
            blocks.append("".join(current))
            current = []
        else:
            current.append(line)
    blocks.append("".join(current))
    # A separator as the very first or last line leaves an empty edge block: not a probe.
    if blocks and not blocks[-1].strip():
        blocks.pop()
    if blocks and not blocks[0].strip():
        blocks.pop(0)
    return [b.replace("\r\n", "\n").strip("\n") for b in blocks]


def _parse_json(path: Path, raw: str) -> ProbeSet:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    name = path.stem
    if isinstance(data, dict):
        if "probes" not in data:
            raise ProbeError(f"{path}: JSON object needs a 'probes' list")
        name = data.get("name", name)
        if not isinstance(name, str) or not name:
            raise ProbeError(f"{path}: 'name' must be a non-empty string")
        data = data["probes"]
    if not isinstance(data, list):
        raise ProbeError(f"{path}: expected a list of strings or {{'name', 'probes'}}")
    if not data:
        raise ProbeError(f"{path}: no probes")
    for i, text in enumerate(data):
        if not isinstance(text, str) or not text.strip():
            raise ProbeError(f"{path}: probe {i} is empty or not a string")
    return ProbeSet(name, tuple(data))
