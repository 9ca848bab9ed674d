"""DeltaSpec: which hidden state and which tokens make up a delta activation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from llgbm_delta.errors import DeltaSpecError

# Bumped whenever the computation behind a DeltaSpec changes, so old cache entries stop matching.
DEFINITION_VERSION = 1
TOKEN_RULES = ("last", "mean")


@dataclass(frozen=True)
class DeltaSpec:
    """The one delta definition: v = mean over probes of pool(hidden_states[layer]).

    delta(adapter) = v(base + adapter) - v(base), in float32.
    """

    # Index into HF `hidden_states`: -1 (default) is the final layer after the final norm, the
    # backbone's `last_hidden_state`; 0 is the embeddings; i is the output of decoder layer i-1.
    layer: int = -1
    # "last": the last real (non-padding) token of each probe (the paper's rule);
    # "mean": the mean over each probe's real tokens.
    token: str = "last"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise DeltaSpecError(f"DeltaSpec.layer must be an int, got {self.layer!r}")
        if self.token not in TOKEN_RULES:
            raise DeltaSpecError(
                f"DeltaSpec.token must be one of {', '.join(TOKEN_RULES)}, got {self.token!r}"
            )

    def to_dict(self) -> dict:
        return {"definition": DEFINITION_VERSION, "layer": self.layer, "token": self.token}

    @property
    def hash(self) -> str:
        """sha256 of the spec fields and the definition version."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# The paper's definition: last layer after the final norm, last real token.
DEFAULT_SPEC = DeltaSpec()
