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
