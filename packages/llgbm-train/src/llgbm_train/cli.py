"""The ``llgbm`` command line: verify, train, train-delta-only, compute-deltas, world, evaluate,
experiment, generate, reproduce, visualize; and llgbm-compose's compose, index, retrieve.

    llgbm train configs/delta_multi.yaml training.steps=100     # world built if missing
    llgbm evaluate runs/delta_multi
    llgbm experiment tiny                                       # configs/experiments/tiny.yaml
    llgbm generate --run runs/delta_multi --prompts task.jsonl --out adapters/task
    llgbm reproduce runs/delta_multi                            # exit 0 agree, 1 disagree
    llgbm visualize runs/delta_multi                            # PNGs in runs/delta_multi/plots
    llgbm compose worlds/tiny                                   # runs/compose/tiny/report.md
    llgbm retrieve --index worlds/tiny/delta_index --prompts p.jsonl --predictor runs/b2 -k 5

Errors print one ``error: ...`` line and exit 2 (``--debug`` shows the traceback); so does a
failing file system (an unwritable ``runs_dir``). Overrides may come before or after options
(``llgbm train cfg.yaml --name x training.steps=1``). A run is trained, resumed or evaluated by
one process at a time (``runs/.<name>.lock``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

from llgbm_flora.cli_errors import run_command

DEFAULT_CONFIG = "configs/delta_multi.yaml"
DELTA_ONLY_CONFIGS = {"b1": "configs/delta_only.yaml", "b2": "configs/delta_retrieve.yaml"}
COMPOSE_COMMANDS = ("compose", "index", "retrieve")  # mounted from llgbm_compose.cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llgbm",
        description="Learning LoRA Generators by Behavioural Matching. Start with "
        "`llgbm verify`, then `llgbm train configs/delta_multi.yaml`.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug is accepted before or after the command (SUPPRESS keeps the top-level value).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name, **kw):
        return _add(name, **{**kw, "parents": [common, *kw.get("parents", ())]})

    sub.add_parser = add_parser  # type: ignore[method-assign]

    v = sub.add_parser("verify", help="check environment, world and one real training step")
    v.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help="config (default: %(default)s)"
    )
    v.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    for name, helptext in (
        ("train", "train a generator: CONFIG [key=value ...], then evaluate it"),
        (
            "train-delta-only",
            "train with the delta only: b1 a generator, b2 a delta predictor + retrieve + merge",
        ),
    ):
        t = sub.add_parser(name, help=helptext, description=helptext)
        if name == "train":
            t.add_argument("config", help="YAML config, e.g. configs/delta_multi.yaml")
        else:
            t.add_argument(
                "--variant",
                choices=sorted(DELTA_ONLY_CONFIGS),
                default="b1",
                help="b1: delta loss through the base model + norm penalty + anchor; b2: a "
                "delta predictor whose adapter merges the training teachers it retrieves",
            )
            t.add_argument(
                "config",
                nargs="?",
                default=None,
                help="config (default: configs/delta_only.yaml for b1, "
                "configs/delta_retrieve.yaml for b2)",
            )
        t.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. training.steps=50 training.lr=1e-4",
        )
        t.add_argument("--name", help="run name (default: the config's name or file stem)")
        t.add_argument(
            "--resume", action="store_true", help="continue runs/<name> from its newest checkpoint"
        )
        t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
        t.add_argument(
            "--stop-after",
            type=int,
            metavar="STEPS",
            help="stop (resumably, with a checkpoint) after this many steps",
        )

    c = sub.add_parser("compute-deltas", help="teacher deltas of a world into the delta cache")
    c.add_argument("--world", help="world directory (default: the config's world.dir)")
    c.add_argument(
        "--config", default=DEFAULT_CONFIG, help="config giving probes, delta spec, cache"
    )
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    w = sub.add_parser(
        "world",
        help="build, show, import or measure a world (the llgbm_worlds CLI, every option)",
        add_help=False,
    )
    w.add_argument("world_args", nargs=argparse.REMAINDER, help="see `llgbm world --help`")

    e = sub.add_parser(
        "evaluate", help="evaluate a run's newest checkpoint on held-out and seen tasks"
    )
    e.add_argument("run", help="run directory, e.g. runs/delta_multi")
    e.add_argument(
        "--tasks",
        choices=["heldout", "train", "all"],
        default=None,
        help="which tasks to score (default: the run's eval.tasks); replaces eval/ (report.md, "
        "report.json, adapters/) as a whole",
    )
    x = sub.add_parser(
        "experiment",
        help="objectives x seeds x worlds (+ ablations), resumable; writes docs/results.md",
        description="Run an experiment spec (configs/experiments/NAME.yaml): every objective "
        "config x generator seed x world, plus its ablations. Finished runs are reused; rerun "
        "after a kill to continue. Writes the spec's results.json and results.md.",
    )
    x.add_argument("spec", help="a name in configs/experiments/ (e.g. tiny) or a YAML path")
    x.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for every run (they change the runs: use another --out)",
    )
    x.add_argument("--out", help="directory of the experiment's runs (default: the spec's)")
    x.add_argument("--report", help="Markdown report path (default: the spec's)")
    x.add_argument("--results", help="results JSON path (default: the spec's)")
    x.add_argument("--plan", action="store_true", help="list the runs and which are done; run none")
    x.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, one process each (CPU threads split between them; on one "
        "GPU, small runs share it). Default 1",
    )
    _add_generate(sub)
    _add_reproduce(sub)
    _add_visualize(sub)
    from llgbm_compose.cli import add_commands

    add_commands(sub, predictor=_run_predictor)  # compose, index, retrieve (llgbm-compose)
    return p


def _run_predictor(args):
    """``llgbm retrieve --prompts F --predictor RUN``: prompts -> delta from a trained run."""
    from llgbm_train.predictor import prompt_predictor
    from llgbm_train.runs import RunError

    if not args.predictor:
        raise RunError(
            "retrieve --prompts: name the run that maps prompts to a delta with --predictor RUN "
            "(a delta_only b2 run, or any generator run)"
        )
    return prompt_predictor(args.predictor, progress=not args.no_progress)


def _add_generate(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="a task's prompts -> a PEFT adapter directory, with a trained run",
        description="Generate a LoRA adapter for a task from its prompts with a run's newest "
        "checkpoint; the directory loads with PeftModel.from_pretrained(base, DIR) on the "
        "run's world base.",
        epilog='PROMPTS: JSONL, one object per line with a "prompt" string, the full prompt '
        "text framed like the world's tasks/<task>/train.jsonl (which works as it is; other "
        "fields are ignored). The generator reads exactly generator.n_prompts (N) prompts: N "
        "are used in file order, more are drawn (N, without replacement, by --seed), fewer "
        "are an error.",
    )
    g.add_argument("--run", required=True, help="run directory, e.g. runs/delta_multi")
    g.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="the task's prompts")
    g.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="adapter directory to write: new, empty, or an earlier `llgbm generate` output",
    )
    g.add_argument("--seed", type=int, default=0, help="draw of N prompts from a longer file")


def _add_reproduce(sub) -> None:
    r = sub.add_parser(
        "reproduce",
        help="re-evaluate (or --retrain) a run and compare with its saved numbers",
        description="Rebuild a run from its config.yaml, evaluate its newest checkpoint again "
        "and compare every number of each eval/report*.json (nothing in the run is written). "
        "Exit 0 and 'agree: ...' when all match, 1 and 'disagree: ...' naming the first "
        "differing value otherwise.",
        epilog="Tolerance: exact on CPU (deterministic for a fixed config, seed, CPU and thread "
        "count; another thread count changes float sums at the 1e-6 level, which the verdict "
        "names as float noise); rtol 1e-4, atol 1e-6 on CUDA, whose reductions are not "
        "bitwise reproducible.",
    )
    r.add_argument("run", help="run directory, e.g. runs/delta_multi")
    r.add_argument(
        "--retrain",
        action="store_true",
        help="also retrain from scratch (one process, to the newest checkpoint's step) and "
        "compare metrics.jsonl, then evaluate the retrained generator",
    )
    r.add_argument("--out", metavar="DIR", help="keep the retrained run here (default: temporary)")
    r.add_argument("--rtol", type=float, help="relative tolerance (default: see below)")
    r.add_argument("--atol", type=float, help="absolute tolerance (default: see below)")


def _add_visualize(sub) -> None:
    v = sub.add_parser(
        "visualize",
        help="PNG figures of a run or a world: curves, delta maps, accuracy bars",
        description="Run: training curves next to their trivial baselines, PCA and t-SNE maps "
        "of teacher and generated deltas (coloured by family, marked by split), accuracy per "
        "method with 95%% intervals. World: its teachers' delta maps.",
    )
    v.add_argument("target", metavar="RUN|WORLD", help="run directory or world directory")
    v.add_argument("--out", metavar="DIR", help="output directory (default: RUN/plots)")


def _load(config: str, overrides: list[str]):
    from llgbm_train.config import load_config

    return load_config(config, overrides)


def cmd_verify(args) -> int:
    import torch

    from llgbm_train.runs import environment
    from llgbm_train.trainer import train

    env = environment()
    print(
        f"python {env['python']}  torch {env['packages']['torch']}  "
        f"transformers {env['packages']['transformers']}  peft {env['packages']['peft']}"
    )
    print(f"device: {'cuda ' + str(env['devices']) if torch.cuda.is_available() else 'cpu'}")
    cfg = _load(args.config, args.overrides)
    print(f"config: {args.config} (hash {cfg.hash})")
    t0 = time.perf_counter()
    result = train(cfg, None, max_steps=1, progress=True)
    s = result.setup
    print(
        f"world: {s.world_root} ({len(s.world.tasks)} tasks, {len(s.world.teachers)} teachers, "
        f"{len(s.data)} training samples)"
    )
    rec = result.last
    print(
        f"one training step: loss {rec['loss']:.4g}, "
        + (
            f"weight {rec['loss_w']:.4g} (baseline {rec['loss_w_baseline']:.4g}), "
            if "loss_w" in rec
            else ""
        )
        + f"delta {rec['loss_d']:.4g} (baseline {rec['loss_d_baseline']:.4g}) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print("ok")
    return 0


def cmd_train(args) -> int:
    from llgbm_flora.names import check_name

    from llgbm_train.evaluate import evaluate
    from llgbm_train.reports import print_summary
    from llgbm_train.runs import RunError, new_run_name, run_lock
    from llgbm_train.trainer import make_accelerator, train

    overrides = list(args.overrides)
    if args.command == "train-delta-only":
        args.config = args.config or DELTA_ONLY_CONFIGS[args.variant]
        overrides = [
            "training.objective=delta_only",
            f"training.variant={args.variant}",
            *overrides,
        ]
    cfg = _load(args.config, overrides)
    base = check_name(args.name or cfg.name, "run name", error=RunError)
    runs = Path(cfg.runs_dir)
    acc = make_accelerator(cfg)
    if args.resume:
        name = base
        if not (runs / name / "config.yaml").is_file():
            raise RunError(f"{runs / name}: no run to resume (check --name)")
    else:
        name = new_run_name(runs, base)
    acc.wait_for_everyone()  # every rank picked the name before rank 0 creates the directory
    # Rank 0 alone writes the run, so it alone holds the lock (the other ranks only read).
    lock = run_lock(runs / name) if acc.is_main_process else contextlib.nullcontext()
    try:
        with lock:
            result = train(
                cfg,
                runs / name,
                resume=args.resume,
                stop_after=args.stop_after,
                progress=True,
                accelerator=acc,
            )
            if acc.is_main_process:
                last = result.last.get("loss")
                print(f"run: {runs / name}  ({result.step} steps; last loss {last})")
            if result.stopped_early or args.no_eval or not acc.is_main_process:
                return 0
            report = evaluate(
                result.setup,
                result.generator,
                out_dir=runs / name,
                checkpoint={"step": result.step, "steps": cfg.training.steps},
                progress=True,
            )
    except KeyboardInterrupt:
        if (runs / name / "config.yaml").is_file():
            again = f"llgbm {args.command} {args.config} --name {name} --resume"
            print(f"interrupted: continue the run with `{again}`", file=sys.stderr)
        else:
            print("interrupted before the run started: rerun the same command", file=sys.stderr)
        return 130
    print_summary(report, str(runs / name))
    print(f"report: {runs / name / 'eval' / 'report.md'}")
    return 0


def cmd_compute_deltas(args) -> int:
    import dataclasses

    from llgbm_train import data as D
    from llgbm_train.trainer import load_base, resolve_device

    cfg = _load(args.config, args.overrides)
    if args.world:
        cfg = dataclasses.replace(cfg, world=dataclasses.replace(cfg.world, dir=args.world))
    root = D.ensure_world(cfg)
    world = D.load_world(root)
    model, tok = load_base(world.base_path, cfg, resolve_device(cfg))
    paths = [D.teacher_path(root, t) for t in world.teachers]
    t0 = time.perf_counter()
    deltas = D.teacher_deltas(cfg, model, tok, paths, D.load_probes(cfg), world=world)
    print(
        f"{len(paths)} teacher deltas [{deltas.shape[1]}] in {D.delta_cache_dir(cfg)} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def cmd_world(args) -> int:
    """``llgbm world ...`` is ``python -m llgbm_worlds ...``: one parser, mounted as it is."""
    from llgbm_worlds.cli import build_parser, run

    wargs = build_parser(prog="llgbm world").parse_args(args.world_args)
    args.debug = args.debug or wargs.debug
    return run(wargs)


def cmd_evaluate(args) -> int:
    from llgbm_train.evaluate import evaluate_run
    from llgbm_train.reports import print_summary
    from llgbm_train.runs import run_lock

    with run_lock(args.run):
        report = evaluate_run(args.run, tasks=args.tasks)
    print_summary(report, args.run)
    print(f"report: {Path(args.run) / 'eval' / 'report.md'}")
    return 0


def cmd_experiment(args) -> int:
    import dataclasses

    from llgbm_train.experiment import load_spec, plan, run_experiment, run_state
    from llgbm_train.reports import print_experiment

    spec, path = load_spec(args.spec, tuple(args.overrides))
    given = {"out": args.out, "report": args.report, "results": args.results}
    spec = dataclasses.replace(spec, **{k: v for k, v in given.items() if v})
    if args.plan:
        runs = plan(spec)
        for r in runs:
            also = "".join(f", also {w}/{lab}" for w, lab in r.aliases)
            print(f"{run_state(r):>9}  {r.dir}  ({r.cfg.training.steps} steps{also})")
        print(f"{len(runs)} runs")
        return 0
    try:
        results = run_experiment(spec, source=str(path), jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"interrupted: rerun `llgbm experiment {args.spec}` to continue", file=sys.stderr)
        return 130
    print_experiment(results)
    print(f"report: {spec.report}  results: {spec.results}")
    return 0


def cmd_generate(args) -> int:
    from llgbm_train.generate import generate_dir

    rec = generate_dir(args.run, args.prompts, args.out, seed=args.seed)
    print(
        f"adapter: {args.out}  (rank {rec['rank']}, {', '.join(rec['target_modules'])}; "
        f"{len(rec['prompts'])} of {rec['n_in_file']} prompts; {rec['run']} {rec['checkpoint']})"
    )
    return 0


def cmd_reproduce(args) -> int:
    from llgbm_train.reproduce import (
        ReproduceError,
        Tolerance,
        reproduce_evaluation,
        reproduce_training,
        verdict,
    )

    if args.out and not args.retrain:
        raise ReproduceError("--out: only with --retrain (where to keep the retrained run)")
    tol = None
    if args.rtol is not None or args.atol is not None:
        tol = Tolerance(rtol=args.rtol or 0.0, atol=args.atol or 0.0)
    if args.retrain:
        comparisons = reproduce_training(args.run, tol=tol, out=args.out)
    else:
        comparisons = reproduce_evaluation(args.run, tol=tol)
    ok, line = verdict(comparisons)
    print(line)
    return 0 if ok else 1


def cmd_visualize(args) -> int:
    from llgbm_train.visualize import visualize

    for path in visualize(args.target, args.out):
        print(path)
    return 0


COMMANDS = {
    "verify": cmd_verify,
    "train": cmd_train,
    "train-delta-only": cmd_train,
    "compute-deltas": cmd_compute_deltas,
    "world": cmd_world,
    "evaluate": cmd_evaluate,
    "experiment": cmd_experiment,
    "generate": cmd_generate,
    "reproduce": cmd_reproduce,
    "visualize": cmd_visualize,
}


# What to do after Ctrl-C, per command (train says it itself: it knows the run's name).
INTERRUPTED = {
    "world": "interrupted: rerun the same command to resume the build",
    "compute-deltas": "interrupted: rerun the same command (finished deltas are cached)",
    "evaluate": "interrupted: rerun the same command to evaluate again",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides are also accepted after the options."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "world":
        # Options of the mounted worlds CLI that argparse's REMAINDER leaves out (--help, ...).
        args.world_args = [*extra, *args.world_args]
    elif extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None, _show=None):
    # Our own warnings (a damaged checkpoint skipped) read as one line, like errors.
    if category.__module__.startswith("llgbm_"):
        print(f"warning: {message}", file=sys.stderr)
    else:
        (_show or warnings.showwarning)(message, category, filename, lineno, file, line)


def cmd_compose(args) -> int:
    """``llgbm compose|index|retrieve``: llgbm_compose's commands, mounted as they are."""
    from llgbm_compose.cli import run

    return run(args)


for _name in COMPOSE_COMMANDS:
    COMMANDS[_name] = cmd_compose


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _parse(argv)
    shown = warnings.showwarning
    if not args.debug:
        # A deprecation notice PEFT triggers inside transformers while scoring; not actionable.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.showwarning = lambda *a, **k: _show_warning(*a, **k, _show=shown)
    try:
        return run_command(
            lambda: COMMANDS[args.command](args),
            debug=args.debug,
            interrupted=INTERRUPTED.get(args.command, "interrupted"),
        )
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
