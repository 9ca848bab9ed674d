# llgbm recipes. `uv run just --list` explains each one.

set positional-arguments

export HF_HUB_OFFLINE := "1"
export TRANSFORMERS_OFFLINE := "1"

# List the recipes.
default:
    @just --list

# Run the test suite (offline, CPU). Extra pytest arguments pass through: `just test -k flora`.
test *args:
    uv run pytest "$@"

# Lint and check formatting.
lint:
    uv run ruff check .
    uv run ruff format --check .

# Build every package's wheel into dist/.
build:
    for p in packages/*/; do uv build --package "$(basename "$p")" --out-dir dist; done

# Check the environment, the world and one real training step: `just verify`.
verify *args:
    uv run llgbm verify "$@"

# Build a world (tiny: CPU minutes; smollm2: GPU zoo): `just world tiny`, `just world tiny --preset test`.
world kind="tiny" *args:
    uv run llgbm world build "$@"

# Teacher deltas of a world into its delta cache: `just compute-deltas --world worlds/tiny`.
compute-deltas *args:
    uv run llgbm compute-deltas "$@"

# Train a config from configs/ and evaluate it on held-out tasks: `just train delta_multi training.steps=50`.
train config *args:
    uv run llgbm train configs/{{config}}.yaml {{args}}

# Run an experiment spec (objectives x seeds x worlds + ablations) into docs/results.md; rerun to continue: `just experiment tiny`.
experiment name="tiny" *args:
    uv run llgbm experiment {{name}} {{args}}

# PNG figures of a run (curves, delta maps, accuracy bars) or a world: `just plots runs/delta_multi`.
plots run *args:
    uv run llgbm visualize "$@"

# Open the explorer (Streamlit on 127.0.0.1:8501) over a world, its delta cache and runs: `just explorer --world worlds/tiny --runs runs`.
explorer *args:
    uv run llgbm-explorer "$@"
