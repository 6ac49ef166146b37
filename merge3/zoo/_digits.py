"""The digits demo zoo: real data (scikit-learn's bundled UCI digits), tasks that genuinely interfere.

Tasks are the same ten digits seen through different input domains (upright, rotated 90°, inverted, flipped upside
down, pixel-permuted). A "pretrained" MLP encoder learns generic features on a mixture of *other* domains; each task
fine-tunes it with its own head. Merging the encoders while keeping every task's frozen head is the standard
multi-task protocol (as for CLIP ViT-B/32 × 8 tasks), and on this zoo it shows the same ordering the literature
reports: task arithmetic well below the fine-tunes, TSV-Merge above task arithmetic.

Three more models learn the upright task from scratch with different seeds: the input for C2M3 / weight matching.

Everything is deterministic for a seed and takes seconds on one CPU core.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from merge3._errors import Merge3Error
from merge3.itembank import BankSpec, ItemBank, make_evaluator, write_bank
from merge3.models import MLP, atomic_dir, file_in_the_way, load_model, save_model, state_dict_sha256

RECIPE_VERSION = 2  # 2: banks with a search/test split
TASKS = ("upright", "rot90", "inverted", "flipud", "permuted")
PRETRAIN_DOMAINS = ("upright", "rot270", "fliplr")
ENCODER_SIZES = [64, 1024, 1024]
SAME_TASK_SIZES = [64, 256, 256, 10]
SAME_TASK_SEEDS = 3


@dataclass(frozen=True)
class DigitsRecipe:
    seed: int = 0
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    same_task_epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    tasks: tuple[str, ...] = TASKS
    test_fraction: float = 1 / 3  # of the held-out images, the same ones in every task: never seen by a search

    def as_dict(self) -> dict:
        return {**self.__dict__, "tasks": list(self.tasks), "recipe_version": RECIPE_VERSION}


def domain_transform(name: str, seed: int):
    """The input transform of a domain, on flattened 8×8 images in [0, 1]; ``"rot90+inverted"`` composes domains
    left to right (rotate, then invert).

    >>> x = np.eye(8, dtype=np.float32).reshape(1, 64)
    >>> bool((domain_transform("rot90+inverted", 0)(x) == 1 - domain_transform("rot90", 0)(x)).all())
    True
    """
    if "+" in name:
        steps = [domain_transform(part, seed) for part in name.split("+")]

        def composed(x):
            for step in steps:
                x = step(x)
            return x
        return composed
    images = lambda x: x.reshape(-1, 8, 8)  # noqa: E731
    if name == "permuted":
        perm = np.random.default_rng(seed + 12345).permutation(64)
        return lambda x: x[:, perm]
    transforms = {
        "upright": lambda x: x,
        "rot90": lambda x: np.rot90(images(x), 1, axes=(1, 2)).reshape(-1, 64),
        "rot270": lambda x: np.rot90(images(x), 3, axes=(1, 2)).reshape(-1, 64),
        "inverted": lambda x: 1.0 - x,
        "flipud": lambda x: images(x)[:, ::-1, :].reshape(-1, 64),
        "fliplr": lambda x: images(x)[:, :, ::-1].reshape(-1, 64),
    }
    if name not in transforms:
        raise Merge3Error(f"unknown digits domain '{name}' (known: {', '.join([*transforms, 'permuted'])})")
    return transforms[name]


def load_split(seed: int):
    """Stratified 50/50 split of the 1,797 digits; returns (x_train, y_train, x_test, y_test, test_index)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    index = np.arange(len(x))
    tr, te = train_test_split(index, test_size=0.5, stratify=data.target, random_state=seed)
    return x[tr], data.target[tr], x[te], data.target[te], te


class _WithHead(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, recipe: DigitsRecipe, seed: int) -> None:
    xs, ys = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(xs), generator=order).split(recipe.batch_size):
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def _head_bytes(head: nn.Linear) -> bytes:
    return safetensors_bytes({k: v.detach().contiguous() for k, v in head.state_dict().items()})


@dataclass
class Zoo:
    """Paths and facts of a built zoo (see ``zoo.json`` in its folder)."""

    path: Path
    base: Path
    finetuned: dict[str, Path]
    same_task: list[Path]
    bank: Path
    same_task_bank: Path
    info: dict = field(default_factory=dict)


def _zoo_from_info(path: Path, info: dict) -> Zoo:
    return Zoo(
        path=path,
        base=path / "base",
        finetuned={t: path / f"ft-{t}" for t in info["recipe"]["tasks"]},
        same_task=[path / f"seed-{k}" for k in range(SAME_TASK_SEEDS)],
        bank=Path(info["banks"]["tasks"]),
        same_task_bank=Path(info["banks"]["same_task"]),
        info=info,
    )


def build_digits_zoo(
    out: str | Path = "zoo/digits", banks_dir: str | Path = "item_banks", seed: int = 0, force: bool = False,
    recipe: DigitsRecipe | None = None, log=print,
) -> Zoo:
    """Build (or reuse the cached) digits zoo and its item banks.

    Writes ``out/{base, ft-<task>…, seed-0…2}`` as merge3 model folders (config.json + safetensors),
    ``out/zoo.json`` (recipe, weight hashes, accuracy table), ``banks_dir/digits`` (one item per held-out image per
    task, with each task's frozen head) and ``banks_dir/digits-upright`` (the same-task bank).

    >>> zoo = build_digits_zoo("/tmp/z/digits", "/tmp/z/banks", log=lambda *a: None)  # doctest: +SKIP
    """
    recipe = recipe or DigitsRecipe(seed=seed)
    out, banks_dir = Path(out), Path(banks_dir)
    cached = _cached(out, recipe)
    if cached is not None and not force:
        log(f"digits zoo: cached at {out} (seed {recipe.seed})")
        return cached
    _check_replaceable(out, "zoo.json", "--out", "a zoo")
    for bank in ("digits", "digits-upright"):
        _check_replaceable(banks_dir / bank, "bank.yaml", "--banks-dir", "an item bank")
    started = time.perf_counter()
    x_tr, y_tr, x_te, y_te, test_index = load_split(recipe.seed)
    log(f"digits zoo: {len(x_tr)} training and {len(x_te)} held-out images, tasks {', '.join(recipe.tasks)}")

    with atomic_dir(out, overwrite=True) as tmp:
        # base: generic features from a mixture of other domains
        torch.manual_seed(recipe.seed)
        base = _WithHead(MLP(ENCODER_SIZES, final_activation=True), nn.Linear(ENCODER_SIZES[-1], 10))
        mix_x = np.concatenate([domain_transform(d, recipe.seed)(x_tr) for d in PRETRAIN_DOMAINS])
        mix_y = np.concatenate([y_tr] * len(PRETRAIN_DOMAINS))
        _train(base, mix_x, mix_y, recipe.pretrain_epochs, recipe, recipe.seed)
        save_model(base.encoder, tmp / "base")
        log("  base encoder trained")

        heads, hashes = {}, {"base": state_dict_sha256(base.encoder.state_dict())}
        for i, task in enumerate(recipe.tasks):
            model = copy.deepcopy(base)
            _train(model, domain_transform(task, recipe.seed)(x_tr), y_tr, recipe.finetune_epochs, recipe, recipe.seed + 1 + i)
            save_model(model.encoder, tmp / f"ft-{task}")
            heads[task] = model.head
            hashes[f"ft-{task}"] = state_dict_sha256(model.encoder.state_dict())
            log(f"  fine-tuned {task}")

        for k in range(SAME_TASK_SEEDS):
            torch.manual_seed(recipe.seed + 100 + k)
            model = MLP(SAME_TASK_SIZES)
            _train(model, x_tr, y_tr, recipe.same_task_epochs, recipe, recipe.seed + 100 + k)
            save_model(model, tmp / f"seed-{k}")
            hashes[f"seed-{k}"] = state_dict_sha256(model.state_dict())
        log(f"  {SAME_TASK_SEEDS} same-task models trained from different seeds")

        bank = _write_task_bank(banks_dir / "digits", recipe, heads)
        same_bank = _write_same_task_bank(banks_dir / "digits-upright", recipe, x_te, y_te, test_index)
        info = {
            "name": "digits",
            "recipe": recipe.as_dict(),
            "weights_sha256": hashes,
            "banks": {"tasks": str(bank.path), "same_task": str(same_bank.path)},
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        info["accuracy"] = zoo_accuracy_table(_zoo_from_info(tmp, info), bank, same_bank)
        (tmp / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"digits zoo: built in {time.perf_counter() - started:.1f} s at {out}")
    return _zoo_from_info(out, info)


def _check_replaceable(path: Path, marker: str, option: str, what: str) -> None:
    """A rebuild replaces the zoo or bank folders it made (``marker`` inside), never a file or another folder of the
    user's: checked before any training, so a wrong path costs nothing."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).is_file())):
        raise Merge3Error(f"{option}: '{path}' exists and is not {what} (no {marker}): refusing to replace it "
                          "(choose another folder)")
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise Merge3Error(f"{option}: '{blocking}' is a file, not a folder")


def package_versions(sources: dict[str, str]) -> dict[str, str]:
    """``{key: "dist==version"}`` of the registry packages a zoo's data and models come from (recorded in its bank
    and zoo.json); a package that is not installed says so."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dist in sources.items():
        try:
            out[key] = f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            out[key] = f"{dist} (not installed)"
    return out


def cached_info(out: Path, recipe: dict) -> dict | None:
    """The zoo.json of a zoo at ``out`` built with exactly ``recipe``, else None (so the caller rebuilds)."""
    info_file = out / "zoo.json"
    if not info_file.exists():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged zoo.json: the zoo is rebuilt
    return info if isinstance(info, dict) and info.get("recipe") == recipe else None


@dataclass
class FolderZoo:
    """Paths and facts of a zoo of Hugging Face folders (MiniLM, SmolLM): ``base``, one fine-tune per task in
    ``finetuned``, one item bank; ``info`` is its ``zoo.json``."""

    path: Path
    base: Path
    finetuned: dict[str, Path]
    bank: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def from_info(cls, path: Path, info: dict) -> FolderZoo:
        return cls(path=path, base=path / "base", finetuned={t: path / f"ft-{t}" for t in info["recipe"]["tasks"]},
                   bank=Path(info["banks"]["tasks"]), info=info)


def cached_folder_zoo(out: Path, recipe: dict) -> FolderZoo | None:
    """The zoo at ``out`` if it was built with exactly ``recipe`` and its bank and model folders are all there."""
    info = cached_info(out, recipe)
    if info is None:
        return None
    zoo = FolderZoo.from_info(out, info)
    folders = [zoo.base, *zoo.finetuned.values()]
    present = (zoo.bank / "bank.yaml").exists() and all((f / "config.json").exists() for f in folders)
    return zoo if present else None


def _cached(out: Path, recipe: DigitsRecipe) -> Zoo | None:
    info = cached_info(out, recipe.as_dict())
    if info is None:
        return None
    zoo = _zoo_from_info(out, info)
    banks_present = (zoo.bank / "bank.yaml").exists() and (zoo.same_task_bank / "bank.yaml").exists()
    return zoo if banks_present else None


def _bank_source(recipe: DigitsRecipe) -> dict:
    return {"dataset": "sklearn.datasets.load_digits (UCI ML hand-written digits, 8×8)",
            "held_out": "stratified 50/50 (training images never appear in a bank)", "seed": recipe.seed,
            "recipe_version": RECIPE_VERSION}


def test_images(recipe: DigitsRecipe, y_te: np.ndarray, test_index: np.ndarray) -> set[int]:
    """The held-out images of the test split: a ``test_fraction`` stratified by digit, the same in every task, so no
    test image is seen by a search through another domain."""
    from sklearn.model_selection import train_test_split

    _, test = train_test_split(test_index, test_size=recipe.test_fraction, stratify=y_te, random_state=recipe.seed)
    return {int(i) for i in test}


def _split_column(images: np.ndarray, test: set[int]) -> list[str]:
    return ["test" if int(i) in test else "search" for i in images]


_SPLIT_NOTE = "the same held-out images are test items in every task (stratified by digit)"


def _write_task_bank(path: Path, recipe, heads: dict[str, nn.Linear]) -> ItemBank:
    return write_domain_bank(
        path, {t: t for t in recipe.tasks}, recipe, heads={t: _head_bytes(h) for t, h in heads.items()},
        name="digits", description="Held-out UCI digits under five input domains; one frozen linear head per task.",
        source=_bank_source(recipe))


def write_domain_bank(path: str | Path, tasks: dict[str, str], recipe: DigitsRecipe, *, name: str, description: str,
                      heads: dict[str, bytes] | None = None, source: dict | None = None) -> ItemBank:
    """A classifier bank of the held-out digits (the zoo's, split into search and test items as the zoo's banks are)
    with one task per ``tasks`` entry (task → its input domain, composable: ``"rot90+inverted"``). ``heads``: the
    safetensors bytes of each task's frozen linear head (the bank's models are then encoders); none: the models
    output the ten digits' logits themselves.

    >>> bank = write_domain_bank("/tmp/b", {"new": "rot90+inverted"}, DigitsRecipe(), name="x", description="x")  # doctest: +SKIP
    """
    _, _, x_te, y_te, test_index = load_split(recipe.seed)
    test = test_images(recipe, y_te, test_index)
    frames = [pd.DataFrame({
        "item_id": [f"{task}-{j:04d}" for j in test_index],
        "task": task,
        "input": list(np.ascontiguousarray(domain_transform(domain, recipe.seed)(x_te), dtype=np.float32)),
        "answer": y_te.astype(np.int64),
        "source_index": test_index,
        "split": _split_column(test_index, test),
    }) for task, domain in tasks.items()]  # fmt: skip
    evaluator = {"kind": "classifier"}
    if heads is not None:
        evaluator["heads"] = {t: f"heads/{t}.safetensors" for t in tasks}
    spec = BankSpec(name=name, description=description, tasks=list(tasks), evaluator=evaluator,
                    source=source or _bank_source(recipe))
    files = {f"heads/{t}.safetensors": heads[t] for t in tasks} if heads is not None else None
    return write_bank(path, spec, pd.concat(frames, ignore_index=True), files, split_description=_SPLIT_NOTE)


def _write_same_task_bank(path: Path, recipe, x_te, y_te, test_index) -> ItemBank:
    items = pd.DataFrame({
        "item_id": [f"upright-{j:04d}" for j in test_index], "task": "upright",
        "input": list(x_te.astype(np.float32)), "answer": y_te.astype(np.int64), "source_index": test_index,
        "split": _split_column(test_index, test_images(recipe, y_te, test_index)),
    })  # fmt: skip
    spec = BankSpec(name="digits-upright", description="Held-out upright UCI digits; models output class logits.",
                    tasks=["upright"], evaluator={"kind": "classifier"}, source=_bank_source(recipe))
    return write_bank(path, spec, items, split_description=_SPLIT_NOTE)


def zoo_accuracy_table(zoo: Zoo, bank: ItemBank, same_bank: ItemBank, lambdas=(0.2, 0.3, 0.4, 0.6, 0.8, 1.0)) -> dict:
    """Per-task held-out accuracy of the base, every fine-tune, task arithmetic over a λ grid, and the same-task
    models with their naive average: the interference a merge search has to beat."""
    evaluate = make_evaluator(bank)
    base = load_model(zoo.base)
    fts = {t: load_model(p) for t, p in zoo.finetuned.items()}
    rows = {"base": bank.per_task_accuracy(evaluate(base))}
    for task, model in fts.items():
        rows[f"ft-{task}"] = bank.per_task_accuracy(evaluate(model))
    base_sd = base.state_dict()
    deltas = [{k: m.state_dict()[k] - base_sd[k] for k in base_sd} for m in fts.values()]
    for lam in lambdas:
        merged = copy.deepcopy(base)
        merged.load_state_dict({k: base_sd[k] + lam * sum(d[k] for d in deltas) for k in base_sd})
        rows[f"TA λ={lam}"] = bank.per_task_accuracy(evaluate(merged))
    same_eval = make_evaluator(same_bank)
    seeds = [load_model(p) for p in zoo.same_task]
    same = {f"seed-{k}": float(same_eval(m).mean()) for k, m in enumerate(seeds)}
    avg = copy.deepcopy(seeds[0])
    avg.load_state_dict({k: sum(m.state_dict()[k] for m in seeds) / len(seeds) for k in avg.state_dict()})
    same["naive average"] = float(same_eval(avg).mean())
    return {"tasks": rows, "same_task": same}


def print_zoo_table(zoo: Zoo, console=None) -> None:
    """The zoo's accuracy table with rich: rows = models, columns = tasks + mean."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    acc = zoo.info["accuracy"]
    tasks = list(zoo.info["recipe"]["tasks"])
    zoo_name = zoo.info.get("name", "digits")
    table = Table(title=f"{zoo_name} zoo — held-out accuracy per task (seed {zoo.info['recipe']['seed']})")
    table.add_column("model")
    for t in [*tasks, "mean"]:
        table.add_column(t, justify="right")
    for name, row in acc["tasks"].items():
        values = [row[t] for t in tasks]
        table.add_row(name, *(f"{v:.3f}" for v in values), f"[bold]{np.mean(values):.3f}[/bold]")
    console.print(table)
    same = acc.get("same_task")
    if same:
        console.print("same-task models (upright, different seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in same.items()))
