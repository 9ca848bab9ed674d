"""The Alpaca prompt frame every task uses, identical to the frame of the generic probes.

Delta Activations probe a model with ``HEADER + "\\n\\n### Instruction:\\n{task} Input:{input}
\\n\\n### Response:"``. Tasks use the very same frame, so a LoRA trained on a task moves the hidden
state at the probe's last token (where a fine-tuned model starts answering).
"""

from __future__ import annotations

from llgbm_delta.probes import GENERIC_HEADERS, GENERIC_INPUT, GENERIC_TASK

# The five Alpaca-style headers of the generic probe set (Delta Activations): llgbm-delta's own.
HEADERS: tuple[str, ...] = GENERIC_HEADERS
INSTRUCTION_TAG = "\n\n### Instruction:\n"
RESPONSE_TAG = "\n\n### Response:"


def format_prompt(instruction: str, input: str = "", *, header: int = 0) -> str:
    """Return the Alpaca prompt for ``instruction`` (and ``input``), ending at ``### Response:``.

    ``header`` picks one of the five :data:`HEADERS` (0 is the classic Alpaca one). With an input
    the text reads ``{instruction} Input:{input}`` exactly as in the generic probes.
    """
    if not 0 <= header < len(HEADERS):
        raise ValueError(f"header: must be in 0..{len(HEADERS) - 1}, got {header}")
    body = f"{instruction} Input:{input}" if input else instruction
    return f"{HEADERS[header]}{INSTRUCTION_TAG}{body}{RESPONSE_TAG}"


def generic_probe_texts() -> list[str]:
    """The five generic probe texts (one per header), as Delta Activations defines them."""
    return [format_prompt(GENERIC_TASK, GENERIC_INPUT, header=i) for i in range(len(HEADERS))]


def full_text(prompt: str, answer: str) -> str:
    """The training text of one example: prompt, one space, answer (the EOS token is added apart)."""
    return f"{prompt} {answer}"
