"""Nothing breaks and nothing is lost: every hostile input to every command is one ``error: …`` line on stderr (no
traceback), exit status 2, and the disk exactly as it was (no ``.tmp-*`` folder, no half output, the user's files
byte-identical).

Every case runs ``python -m merge3 …`` as a user types it. Starting Python and importing torch takes ~3 s, so the
tables go through a *warm* runner: one interpreter imports merge3 once, then forks a fresh child per case that runs
``merge3/__main__.py`` with its own argv, cwd, environment and stdout/stderr files — the same code path as a new
process (``sys.path[0]`` is the working folder, as ``-m`` sets it, and ``__main__`` drops it). Signals, locks and a
few representative cases always run in real subprocesses; ``MERGE3_HOSTILE_COLD=1`` runs every case that way.

Models are tiny merge3 MLPs (8→16→16) with a two-task classifier bank of 48 items, built once per module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from _runs import ENV, wait_for_lines

COLD = os.environ.get("MERGE3_HOSTILE_COLD") == "1"
HAS_CUDA = torch.cuda.is_available()
TOKEN = re.compile(r"@(\w+)")

# ---- the runner ---------------------------------------------------------------------------------------------------

_SERVER = r"""
import json, os, runpy, sys, traceback
import torch
torch.set_num_threads(1)
import merge3, merge3.cli  # noqa: F401  (what every command imports first)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import pymoo.algorithms.soo.nonconvex.ga  # noqa: F401
MAIN = os.path.join(os.path.dirname(merge3.__file__), "__main__.py")
replies = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.update(request["env"])
            for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                   (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
                opened = os.open(name, mode, 0o644)
                os.dup2(opened, fd)
                os.close(opened)
            sys.argv = [MAIN, *request["argv"]]
            extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:1] = [os.getcwd(), *extra]  # `python -m`: the working folder first, then $PYTHONPATH
            try:
                runpy.run_module("merge3", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
    replies.flush()
"""


@dataclass
class Out:
    returncode: int
    stdout: str
    stderr: str


class WarmRunner:
    def __init__(self, folder: Path):
        self.folder = folder
        self.calls = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=ENV, cwd=folder)

    def __call__(self, args: list[str], cwd: Path, env: dict[str, str]) -> Out:
        self.calls += 1
        out, err = self.folder / f"{self.calls}.out", self.folder / f"{self.calls}.err"
        request = {"argv": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the warm runner died"
        return Out(json.loads(reply)["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def cold(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Out:
    """``python -m merge3 ARGS`` in a new process."""
    done = subprocess.run([sys.executable, "-m", "merge3", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd)
    return Out(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    if COLD:
        yield cold
        return
    warm = WarmRunner(tmp_path_factory.mktemp("warm"))
    yield warm
    warm.close()


# ---- what is checked ------------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones included) with the sha256 of each file (a link: its target)."""
    return {str(p.relative_to(root)): f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def live_snapshot(root: Path) -> dict[str, str]:
    """``snapshot`` of a folder another process is still writing: its in-flight temporaries (hidden names other than
    ``.lock``, renamed into place a moment later) are left out, and a file that vanishes while it is read is skipped."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".") and p.name != ".lock":
            continue
        try:
            out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        except FileNotFoundError:
            continue
    return out


def one_error(out: Out, rc: int = 2, *needles: str) -> str:
    """The exit status is ``rc``, stderr is exactly one ``error:`` line holding every needle, no traceback."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == rc, f"exit {out.returncode}, stderr: {out.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line: {lines}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- tiny models, bank, run ---------------------------------------------------------------------------------------

SIZES = [8, 16, 16]


def _mlp(seed: int):
    from merge3.models import MLP

    torch.manual_seed(seed)
    return MLP(SIZES, final_activation=True)


def _items(width: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.concat([pd.DataFrame({
        "item_id": [f"{t}-{j}" for j in range(24)], "task": t,
        "input": list(rng.normal(size=(24, width)).astype(np.float32)), "answer": rng.integers(0, 3, 24),
    }) for t in ("a", "b")], ignore_index=True)


def _head(rows: int = 3, cols: int = 16) -> bytes:
    from safetensors.torch import save

    return save({"weight": torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)),
                 "bias": torch.zeros(rows)})


def _bank(path: Path, heads: dict[str, bytes] | None = None, width: int = 8,
          items: Callable[[pd.DataFrame], pd.DataFrame] = lambda items: items, headless: bool = False) -> Path:
    from merge3.itembank import BankSpec, write_bank

    heads = {} if headless else heads or {t: _head() for t in "ab"}
    spec = BankSpec(name="tiny", tasks=["a", "b"],
                    evaluator={"kind": "classifier",
                               "heads": None if headless else {t: f"heads/{t}.safetensors" for t in "ab"}})
    files = {f"heads/{t}.safetensors": data for t, data in heads.items()}
    write_bank(path, spec, items(_items(width)), files, test_fraction=0.25, seed=0)
    return path


def _nan_head() -> bytes:
    from safetensors.torch import save

    weight = torch.zeros(3, 16)
    weight[1, 2] = float("nan")
    return save({"weight": weight, "bias": torch.zeros(3)})


def _with_input(row: int, vector, dtype=np.float32) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(items: pd.DataFrame) -> pd.DataFrame:
        items = items.copy()
        items["input"] = [np.asarray(v, dtype=dtype) for v in items["input"]]  # parquet wants one dtype per column
        items.at[row, "input"] = np.asarray(vector, dtype=dtype)
        return items
    return change


class Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


MODULES = {
    "obj_import_raises.py": "raise RuntimeError('boom at import')\n",
    "obj_exit.py": "import sys\nsys.exit(3)\n",
    "obj_exit0.py": "import sys\nsys.exit(0)\n",
    "obj_fns.py": ("import time\n\ndef no_arg():\n    return 1.0\n\ndef raises(result):\n    raise ValueError('bad candidate')\n\n"
                   "def nan(result):\n    return float('nan')\n\ndef text(result):\n    return 'high'\n\n"
                   "def exits(result):\n    raise SystemExit(4)\n\nnot_callable = 3\n\n"
                   "def slow_mean(result):  # a search that takes its time without taking the CPU\n"
                   "    time.sleep(0.05)\n    return result.mean\n"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Paths of every shared input, by name (``@name`` in the tables)."""
    from merge3.models import load_state_dict, save_model, save_state_dict

    import merge3

    root = tmp_path_factory.mktemp("assets")
    base = _mlp(0)
    save_model(base, root / "base")
    for i, name in enumerate(("a", "b"), 1):
        model = _mlp(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        save_model(model, root / name)
    config = base.config()
    state = load_state_dict(root / "a")
    bad = root / "bad"
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = {k: v.clone() for k, v in state.items()}
        broken["layers.0.weight"][0, 0] = value
        save_state_dict(broken, bad / name, config=config)
    save_state_dict({**state, "layers.1.weight": torch.zeros(16, 20)}, bad / "shape", config=config)
    save_state_dict({k: v * 6e4 for k, v in state.items()}, bad / "big", config=config)
    save_state_dict({k: v.to(torch.int32) for k, v in state.items()}, bad / "int", config=config)
    shard = "model-00001-of-00001.safetensors"
    for name, data in (("corrupt", b"not a safetensors file"), ("truncated", (root / "a" / shard).read_bytes()[:300])):
        shutil.copytree(root / "a", bad / name)
        (bad / name / shard).write_bytes(data)
    for name, obj in (("pickle", {"w": torch.ones(2), "path": Path("x")}), ("evil", {"w": Evil()})):
        (bad / name).mkdir()
        shutil.copy(root / "a" / "config.json", bad / name)
        torch.save(obj, bad / name / "pytorch_model.bin")
    shutil.copytree(root / "a", bad / "noconfig")
    (bad / "noconfig" / "config.json").unlink()
    (bad / "noweights").mkdir()
    shutil.copy(root / "a" / "config.json", bad / "noweights")
    for name, text in (("badconfig", "{broken"), ("listconfig", "[1, 2]"),
                       ("otherarch", json.dumps({**config, "merge3_architecture": "transformer"}))):
        shutil.copytree(root / "a", bad / name)
        (bad / name / "config.json").write_text(text)

    _bank(root / "bank")
    banks = root / "banks"
    _bank(banks / "no_head")
    (banks / "no_head" / "heads" / "a.safetensors").unlink()
    _bank(banks / "corrupt_head", heads={"a": b"junk", "b": _head()})
    _bank(banks / "wide_head", heads={"a": _head(3, 7), "b": _head()})
    _bank(banks / "narrow_items", width=5)
    _bank(banks / "nan_head", heads={"a": _nan_head(), "b": _head()})
    _bank(banks / "nan_input", items=_with_input(30, [0.0] * 7 + [float("nan")]))
    _bank(banks / "ragged_input", items=_with_input(30, [0.5] * 5))
    _bank(banks / "headless", headless=True)  # the model's 16 outputs would be read as 16 class logits
    _bank(banks / "huge_input", items=_with_input(30, [1e300] + [0.0] * 7, dtype=np.float64))  # Inf as float32
    _bank(banks / "binary_yaml")
    (banks / "binary_yaml" / "bank.yaml").write_bytes(b"\xff\xfe name: x\n")

    mods = root / "mods"
    mods.mkdir()
    for name, text in MODULES.items():
        (mods / name).write_text(text)
    paths = {"root": root, "base": root / "base", "a": root / "a", "b": root / "b", "bank": root / "bank",
             "mods": mods, "shard": root / "base" / shard, "configjson": root / "base" / "config.json",
             **{name: bad / name for name in ("nan", "inf", "shape", "big", "int", "corrupt", "truncated", "pickle", "evil",
                                              "noconfig", "noweights", "badconfig", "listconfig", "otherarch")},
             **{name: banks / name for name in ("no_head", "corrupt_head", "wide_head", "narrow_items", "binary_yaml",
                                                 "nan_head", "nan_input", "ragged_input", "huge_input",
                                                 "headless")}}
    paths = {k: str(v) for k, v in paths.items()}
    outcome = merge3.search(_subst(_space_dict(), paths), runs_dir=root / "runs", name="good", progress=False)
    assert outcome.run.meta["status"] == "finished"
    paths["run"] = str(root / "runs" / "good")
    return paths


def _space_dict(**over) -> dict:
    space = {
        "name": "tiny", "seed": 0,
        "models": {"base": "@base", "endpoints": ["@a", "@b"]},
        "bank": {"path": "@bank", "estimator": "naive", "items_per_task": 5},
        "genome": {"granularity": "layer", "methods": ["task_arithmetic", "ties"]},
        "engine": {"population": 4, "generations": 2},
    }
    return _merge(space, over)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _subst(obj, paths: dict[str, str]):
    if isinstance(obj, str):
        return TOKEN.sub(lambda m: paths.get(m.group(1), m.group(0)), obj)
    if isinstance(obj, dict):
        return {k: _subst(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_subst(v, paths) for v in obj]
    return obj


def space(**over) -> str:
    """A search-space YAML: the tiny space with ``over`` merged in (NaN and Inf dump as .nan / .inf; ``@name``
    tokens are replaced by the asset paths when the file is written)."""
    return yaml.safe_dump(_merge(_space_dict(), over), sort_keys=False)


def merge_yaml(method: str = "task_arithmetic", model: str = "@a", params: str = "weight: 0.5", extra: str = "",
               base: str = "@base") -> str:
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {model}, parameters: {{{params}}}}}\n"
            f"  - {{model: @b, parameters: {{{params}}}}}\n{extra}")


# ---- the cases ------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    args: str
    needles: tuple[str, ...] = ()
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[dict, Path], None] | None = None  # (paths, working folder)
    rc: int = 2
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # text that must appear on neither stream (a pickle's payload)


def C(id, args, *needles, marks=(), **kw):  # noqa: N802  (a table row)
    return pytest.param(Case(args, needles, **kw), id=id, marks=marks)


def run_case(case: Case, assets: dict, runner, tmp_path: Path) -> Out:
    work = tmp_path / "work"
    work.mkdir()
    paths = {**assets, "w": str(work)}
    for name, content in case.files.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(_subst(content, paths))
    if case.setup is not None:
        case.setup(paths, work)
    before, shared = snapshot(work), snapshot(Path(assets["root"]))
    out = runner(shlex.split(_subst(case.args, paths)), work, _subst(case.env, paths))
    one_error(out, case.rc, *(_subst(n, paths) for n in case.needles))
    for text in case.absent:
        assert text not in out.stdout + out.stderr
    assert snapshot(work) == before, "the command changed the working folder"
    assert snapshot(Path(assets["root"])) == shared, "the command changed its inputs"
    return out


NO_CUDA = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")

# `merge`: a bad model among the inputs, or a bad config
MERGE = [
    C("weight-not-a-number", "merge m.yaml --out out", "field 'models.0.parameters.weight'", "got 'abc'",
      files={"m.yaml": merge_yaml(params="weight: abc")}),
    C("dare-density-in-mergekit-terms", "merge m.yaml --out out", "field 'models.0.parameters.density': 1e-30 is out "
      "of range [0.01, 1]", files={"m.yaml": merge_yaml("dare_ties", params="weight: 1.0, density: 1.0e-30")}),
    C("scale-nan-names-the-field-alone", "merge m.yaml --out out", "field 'parameters.scale': Input should be a "
      "finite number", files={"m.yaml": merge_yaml(extra="parameters: {scale: .nan}\n")}),
    C("weight-a-boolean", "merge m.yaml --out out", "field 'models.0.parameters.weight'", "got True",
      files={"m.yaml": merge_yaml(params="weight: true")}),
    C("corrupt-safetensors", "merge m.yaml --out out", "cannot read safetensors file", "@corrupt",
      files={"m.yaml": merge_yaml(model="@corrupt")}),
    C("truncated-safetensors", "merge m.yaml --out out", "cannot read safetensors file", "@truncated",
      files={"m.yaml": merge_yaml(model="@truncated")}),
    C("pickle-bin", "merge m.yaml --out out", "not a plain tensor file", "pathlib.PosixPath",
      files={"m.yaml": merge_yaml(model="@pickle")}),
    C("pickle-that-runs-code", "merge m.yaml --out out", "not a plain tensor file", "@evil",
      files={"m.yaml": merge_yaml(model="@evil")}, absent=("PWNED",)),
    C("nan-endpoint", "merge m.yaml --out out", "@nan", "NaN/Inf", "'layers.0.weight'",
      files={"m.yaml": merge_yaml(model="@nan")}),
    C("inf-endpoint", "merge m.yaml --out out", "@inf", "NaN/Inf", files={"m.yaml": merge_yaml(model="@inf")}),
    C("nan-base", "merge m.yaml --out out", "base_model '@nan'", "NaN/Inf", files={"m.yaml": merge_yaml(base="@nan")}),
    C("nan-endpoint-weighted-zero", "merge m.yaml --out out", "models.0.model '@nan'", "NaN/Inf",
      files={"m.yaml": merge_yaml("linear", "@nan", "weight: 0.0", base="null")}),
    C("nan-endpoint-dropped-by-dare", "merge m.yaml --out out", "@nan", "NaN/Inf",
      files={"m.yaml": merge_yaml("dare_linear", "@nan", "weight: 0.5, density: 0.01", "seed: 3\n")}),
    C("overflow-in-float16", "merge m.yaml --out out", "'layers.0.bias'", "overflow",
      files={"m.yaml": "merge_method: task_arithmetic\nbase_model: @base\nmodels:\n"
                       "  - {model: @big, parameters: {weight: 10}}\ndtype: float16\n"}),
    C("no-weights-in-folder", "merge m.yaml --out out", "no weights found in folder '@noweights'",
      files={"m.yaml": merge_yaml(model="@noweights")}),
    C("mis-shaped-endpoint", "merge m.yaml --out out", "'layers.1.weight' 16×20 vs 16×16",
      files={"m.yaml": merge_yaml(model="@shape")}),
    C("endpoint-config-not-json", "merge m.yaml --out out", "@badconfig/config.json' is not valid JSON",
      files={"m.yaml": merge_yaml(model="@badconfig")}),
    C("endpoint-config-a-list", "merge m.yaml --out out", "@listconfig/config.json' is not a JSON object",
      files={"m.yaml": merge_yaml(model="@listconfig")}),
    C("endpoint-other-architecture", "merge m.yaml --out out", "'@otherarch' is not the same architecture as",
      "'merge3_architecture' is 'transformer', not 'mlp'", files={"m.yaml": merge_yaml(model="@otherarch")}),
    C("model-is-a-config-file", "merge m.yaml --out out", "'@configjson' is not a weight file",
      files={"m.yaml": merge_yaml(model="@configjson")}),
    C("model-missing", "merge m.yaml --out out", "field 'models.0.model'", "does not exist",
      files={"m.yaml": merge_yaml(model="@w/nowhere")}),
    C("config-missing", "merge nothing.yaml --out out", "merge config 'nothing.yaml' does not exist"),
    C("config-is-a-folder", "merge @base --out out", "is a folder"),
    C("malformed-yaml", "merge m.yaml --out out", "m.yaml' is not valid YAML", files={"m.yaml": "models: [\n"}),
    C("yaml-is-a-list", "merge m.yaml --out out", "m.yaml' must be a mapping", files={"m.yaml": "- a\n- b\n"}),
    C("not-utf8", "merge m.yaml --out out", "m.yaml' is not UTF-8",
      files={"m.yaml": b"merge_method: ties\n\xff\xfe\n"}),
    C("unknown-field", "merge m.yaml --out out", "field 'colour'", files={"m.yaml": merge_yaml(extra="colour: red\n")}),
    C("unknown-per-model-param", "merge m.yaml --out out", "field 'models.0.parameters.colour'",
      files={"m.yaml": merge_yaml(params="weight: 1, colour: red")}),
    C("unknown-global-param", "merge m.yaml --out out", "unknown parameter 'bogus'",
      files={"m.yaml": merge_yaml(extra="parameters: {bogus: 2}\n")}),
    C("nan-weight", "merge m.yaml --out out", "field 'models.0.parameters.weight", "finite",
      files={"m.yaml": merge_yaml(params="weight: .nan")}),
    C("inf-weight", "merge m.yaml --out out", "field 'models.0.parameters.weight", "finite",
      files={"m.yaml": merge_yaml(params="weight: .inf")}),
    C("minus-inf-weight", "merge m.yaml --out out", "field 'models.0.parameters.weight", "finite",
      files={"m.yaml": merge_yaml(params="weight: -.inf")}),
    C("nan-lambda", "merge m.yaml --out out", "field 'parameters.lambda", "finite",
      files={"m.yaml": merge_yaml("ties", params="weight: 1, density: 0.5", extra="parameters: {lambda: .nan}\n")}),
    C("nan-in-filter-list", "merge m.yaml --out out", "'weights' = nan is out of range",
      files={"m.yaml": merge_yaml(params="weight: [{filter: layers.0, value: .nan}, {value: 1}]")}),
    C("negative-density", "merge m.yaml --out out", "'density' = -0.5 is out of range",
      files={"m.yaml": merge_yaml("ties", params="weight: 1, density: -0.5")}),
    C("density-above-one", "merge m.yaml --out out", "'density' = 1.5 is out of range",
      files={"m.yaml": merge_yaml("ties", params="weight: 1, density: 1.5")}),
    C("unknown-method", "merge m.yaml --out out", "field 'merge_method': 'slerpy' is not supported",
      files={"m.yaml": merge_yaml("slerpy")}),
    C("integer-dtype", "merge m.yaml --out out", "field 'dtype'", files={"m.yaml": merge_yaml(extra="dtype: int8\n")}),
    C("no-models", "merge m.yaml --out out", "field 'models'",
      files={"m.yaml": "merge_method: task_arithmetic\nbase_model: @base\nmodels: []\n"}),
    C("method-needs-a-base", "merge m.yaml --out out", "field 'base_model'",
      files={"m.yaml": "merge_method: task_arithmetic\nmodels:\n  - {model: @a}\n"}),
    C("unknown-device", "merge m.yaml --out out --device tpu7", "--device", "'tpu7'", files={"m.yaml": merge_yaml()}),
    C("cuda-without-cuda", "merge m.yaml --out out --device cuda", "CUDA is not available",
      files={"m.yaml": merge_yaml()}, marks=NO_CUDA),
    C("infinite-shard-size", "merge m.yaml --out out --max-shard-size infGB", "'infGB'",
      files={"m.yaml": merge_yaml()}),
    C("negative-shard-size", "merge m.yaml --out out --max-shard-size=-5MB", "'-5MB'", files={"m.yaml": merge_yaml()}),
    C("out-exists-non-empty", "merge m.yaml --out mine", "'mine' already exists and is not empty",
      files={"m.yaml": merge_yaml(), "mine/notes.txt": "my notes"}),
    C("out-is-a-file", "merge m.yaml --out mine.txt", "'mine.txt' is a file",
      files={"m.yaml": merge_yaml(), "mine.txt": "my notes"}),
    C("out-parent-is-a-file", "merge m.yaml --out mine.txt/out", "'mine.txt' is a file",
      files={"m.yaml": merge_yaml(), "mine.txt": "my notes"}),
    C("out-is-a-dangling-link", "merge m.yaml --out link", "output 'link' is a symbolic link",
      files={"m.yaml": merge_yaml()}, setup=lambda paths, work: (work / "link").symlink_to(work / "nowhere")),
    C("out-is-a-link-to-an-empty-folder", "merge m.yaml --out link", "output 'link' is a symbolic link",
      files={"m.yaml": merge_yaml(), "empty/.keep": ""},
      setup=lambda paths, work: (work / "link").symlink_to(work / "empty")),
    C("seed-above-32-bits", "merge m.yaml --out out", "field 'seed'",  # generators would wrap it to seed 0
      files={"m.yaml": merge_yaml("dare_linear", params="weight: 0.5, density: 0.5", extra="seed: 4294967296\n")}),
    C("negative-seed", "merge m.yaml --out out", "field 'seed'",
      files={"m.yaml": merge_yaml("dare_linear", params="weight: 0.5, density: 0.5", extra="seed: -1\n")}),
    C("seed-a-boolean", "merge m.yaml --out out", "field 'seed'", "not true",
      files={"m.yaml": merge_yaml("dare_linear", params="weight: 0.5, density: 0.5", extra="seed: true\n")}),
    C("method-seed-above-32-bits", "merge m.yaml --out out", "parameter 'seed' = 4294967296 is out of range",
      files={"m.yaml": merge_yaml("dare_linear", params="weight: 0.5, density: 0.5",
                                  extra="parameters: {seed: 4294967296}\n")}),
    C("integer-endpoint", "merge m.yaml --out out", "@int has dtype torch.int32", "where @base has torch.float32",
      files={"m.yaml": merge_yaml(model="@int")}),
    C("yaml-nested-past-recursion", "merge m.yaml --out out", "m.yaml' is nested too deeply",
      files={"m.yaml": "a: " + "[" * 1000 + "]" * 1000 + "\n"}),
    C("yaml-nested-deep", "merge m.yaml --out out", "m.yaml' is nested more than 64 levels",
      files={"m.yaml": "a: " + "[" * 200 + "]" * 200 + "\n"}),
    C("permutation-spec-from-a-config", "merge m.yaml --out out", "'spec' must be a PermutationSpec",
      files={"m.yaml": "merge_method: c2m3\nmodels:\n  - {model: @a}\n  - {model: @b}\nparameters: {spec: bogus}\n"}),
    C("mps-device", "merge m.yaml --out out --device mps", "--device", "MPS (Apple GPU) is not available",
      files={"m.yaml": merge_yaml()}),
    C("second-cpu", "merge m.yaml --out out --device cpu:1", "--device", "there is one CPU device",
      files={"m.yaml": merge_yaml()}),
    C("threads-overflow", "--threads 99999999999 merge m.yaml --out out", "--threads", "more than 4096",
      files={"m.yaml": merge_yaml()}),
    C("threads-env-overflow", "merge m.yaml --out out", "MERGE3_THREADS", "more than 4096",
      files={"m.yaml": merge_yaml()}, env={"MERGE3_THREADS": "99999999999"}),
]


@pytest.mark.parametrize("case", MERGE)
def test_merge(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


# `eval` and `inspect`: the model (or the bank) is the problem
def _drop_column(file: Path, column: str) -> None:
    pd.read_parquet(file).drop(columns=[column]).to_parquet(file)


def _model_copy(edit: Callable[[Path], None]):
    """A setup: endpoint ``a`` copied to ``m`` in the working folder, then ``edit``ed (its config, its index)."""
    def setup(paths, work):
        shutil.copytree(paths["a"], work / "m")
        edit(work / "m")
    return setup


def _json_edit(name: str, change: Callable[[dict], dict]):
    def edit(folder: Path):
        (folder / name).write_text(json.dumps(change(json.loads((folder / name).read_text()))))
    return edit


def _config_with(**fields):
    return _json_edit("config.json", lambda c: {**{k: v for k, v in c.items() if k not in fields},
                                                 **{k: v for k, v in fields.items() if v is not None}})


def _shard_named(name: str):
    return _json_edit("model.safetensors.index.json",
                      lambda i: {**i, "weight_map": {**i["weight_map"], "layers.1.bias": name}})


CONFIGS = {  # config.json fields a hand edit (or a hostile folder) can break
    "sizes-negative": ({"sizes": [8, -16, 16]}, "'sizes' must list at least two layer widths"),
    "sizes-zero": ({"sizes": [8, 0, 16]}, "whole numbers from 1"),
    "sizes-a-string": ({"sizes": "abc"}, "got \"abc\""),
    "sizes-fractional": ({"sizes": [8, 16.5, 16]}, "'sizes' must list"),
    "sizes-10-to-the-30": ({"sizes": [8, 10**30, 16]}, "'sizes' must list"),
    "sizes-missing": ({"sizes": None}, "got null"),
    "sizes-huge-but-whole": ({"sizes": [8, 10**9, 16]}, "do not fit its config.json"),  # refused before allocating
    "final-activation-a-string": ({"final_activation": "yes"}, "'final_activation' must be true or false"),
}

EVAL = [
    *[C(f"config-{name}", "eval m --bank @bank", "m/config.json" if "fit" not in message else "weights in 'm'",
        message, setup=_model_copy(_config_with(**fields))) for name, (fields, message) in CONFIGS.items()],
    C("shard-outside-the-folder", "eval m --bank @bank", "names shard \"../b/model-00001-of-00001.safetensors\"",
      "may not lead outside the model folder", setup=_model_copy(_shard_named("../b/model-00001-of-00001.safetensors"))),
    C("shard-in-a-subfolder", "eval m --bank @bank", "not a file name in 'm'",
      setup=_model_copy(_shard_named("@b/model-00001-of-00001.safetensors"))),
    C("shard-a-folder", "eval m --bank @bank", "names shard 'sub', which is a folder",
      setup=_model_copy(lambda m: (_shard_named("sub")(m), (m / "sub").mkdir()))),
    C("corrupt-safetensors", "eval @corrupt --bank @bank", "cannot read safetensors file", "@corrupt"),
    C("truncated-safetensors", "eval @truncated --bank @bank", "cannot read safetensors file"),
    C("pickle-bin", "eval @pickle --bank @bank", "not a plain tensor file"),
    C("pickle-that-runs-code", "eval @evil --bank @bank", "not a plain tensor file", absent=("PWNED",)),
    C("nan-weights", "eval @nan --bank @bank", "@nan has 1 NaN/Inf value(s) in 'layers.0.weight'"),
    C("inf-weights", "eval @inf --bank @bank", "@inf has 1 NaN/Inf value(s)"),
    C("mis-shaped-vs-config", "eval @shape --bank @bank", "do not fit its config.json", "'layers.1.weight' is 16×20"),
    C("missing-config-json", "eval @noconfig --bank @bank", "'@noconfig' has no config.json"),
    C("folder-without-weights", "eval @noweights --bank @bank", "no weights found in folder '@noweights'"),
    C("model-is-a-file", "eval @shard --bank @bank", "'@shard' is a file"),
    C("model-missing", "eval nowhere --bank @bank", "model folder 'nowhere' does not exist"),
    C("bank-is-a-file", "eval @base --bank @configjson", "has no bank.yaml"),
    C("bank-is-a-model", "eval @base --bank @a", "'@a' has no bank.yaml"),
    C("bank-head-missing", "eval @base --bank @no_head", "head file 'heads/a.safetensors'", "does not exist"),
    C("bank-yaml-malformed", "eval @base --bank bank", "bank.yaml' is not valid YAML",
      setup=lambda a, w: (shutil.copytree(a["bank"], w / "bank"), (w / "bank" / "bank.yaml").write_text("name: [\n"))),
    C("bank-items-corrupt", "eval @base --bank bank", "cannot read items file", "items.parquet",
      setup=lambda a, w: (shutil.copytree(a["bank"], w / "bank"), (w / "bank" / "items.parquet").write_bytes(b"junk"))),
    C("unknown-device", "eval @base --bank @bank --device tpu7", "--device", "'tpu7' is not a device"),
    C("cuda-without-cuda", "eval @base --bank @bank --device cuda", "CUDA is not available", marks=NO_CUDA),
    C("bank-head-corrupt", "eval @base --bank @corrupt_head", "heads/a.safetensors"),
    C("bank-head-mis-shaped", "eval @base --bank @wide_head", "heads/a.safetensors"),
    C("bank-items-too-narrow", "eval @base --bank @narrow_items", "input"),
    C("bank-head-nan", "eval @base --bank @nan_head", "head file 'heads/a.safetensors' for task 'a' holds NaN/Inf"),
    C("bank-item-input-nan", "eval @base --bank @nan_input", "item 'b-6' has NaN/Inf in its 'input'"),
    C("bank-without-heads-for-an-encoder", "eval @base --bank @headless", "has no heads",
      "it gives 16 per item, the bank's answers are 3 classes"),
    C("bank-without-heads-for-an-encoder-search", "search s.yaml --runs-dir runs", "has no heads", "gives 16 per item",
      files={"s.yaml": space(bank={"path": "@headless"})}),
    C("bank-item-input-beyond-float32", "eval @base --bank @huge_input", "item 'b-6' has an 'input' value beyond "
      "float32's range"),
    C("bank-split-column-dropped", "eval @base --bank bank", "bank.yaml has a split but the items lack column 'split'",
      setup=lambda a, w: (shutil.copytree(a["bank"], w / "bank"), _drop_column(w / "bank" / "items.parquet", "split"))),
    C("bank-item-input-ragged", "eval @base --bank @ragged_input", "item 'b-6' has 5 input values, the other items 8"),
    C("bank-yaml-not-utf8", "eval @base --bank @binary_yaml", "bank.yaml"),
]


@pytest.mark.parametrize("case", EVAL)
def test_eval(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


INSPECT = [
    C("corrupt-safetensors", "inspect @base @corrupt @b", "cannot read safetensors file"),
    C("pickle-bin", "inspect @base @pickle @b", "not a plain tensor file"),
    C("nan-weights", "inspect @base @nan @b", "NaN/Inf", "'layers.0.weight'"),
    C("inf-base", "inspect @inf @a @b", "NaN/Inf"),
    C("mis-shaped", "inspect @base @shape @b", "'layers.1.weight' 16×20 vs 16×16"),
    C("no-weights", "inspect @base @noweights", "no weights found"),
    C("out-is-a-file", "inspect @base @a @b --out mine.txt", "'mine.txt' is a file", files={"mine.txt": "notes"}),
    C("out-exists-non-empty", "inspect @base @a @b --out mine", "'mine' already exists and is not empty",
      files={"mine/cosine.csv": "my own table"}),
    C("xi-names-not-tasks", "inspect @base @a @b --names x,y --bank @bank", "'x' is not a task of bank",
      "name each model by its task"),
    C("xi-names-count", "inspect @base @a @b --names a --bank @bank", "--names: give one distinct name per model"),
    C("xi-alphas-not-numbers", "inspect @base @a @b --names a,b --bank @bank --alphas 0,x", "--alphas", "'0,x'"),
    C("xi-alphas-nan", "inspect @base @a @b --names a,b --bank @bank --alphas nan", "--alphas", "'nan'"),
    C("xi-alphas-without-bank", "inspect @base @a @b --alphas 0,1", "give --bank too"),
    C("xi-bank-missing", "inspect @base @a @b --names a,b --bank @w/nowhere", "nowhere"),
]


@pytest.mark.parametrize("case", INSPECT)
def test_inspect(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


# `search`: a bad space, bad models or a bad objective — nothing may be created (not even the runs folder)
SEARCH = [
    C("malformed-yaml", "search s.yaml --runs-dir runs", "s.yaml' is not valid YAML", files={"s.yaml": "a: [1, 2\n"}),
    C("yaml-is-a-list", "search s.yaml --runs-dir runs", "s.yaml' must be a mapping",
      files={"s.yaml": "- a\n"}),
    C("empty-file", "search s.yaml --runs-dir runs", "field 'models': Field required", files={"s.yaml": ""}),
    C("not-utf8", "search s.yaml --runs-dir runs", "s.yaml' is not UTF-8", files={"s.yaml": b"name: x\n\xff\xfe\n"}),
    C("space-is-a-folder", "search @base --runs-dir runs", "is a folder"),
    C("space-missing", "search nothing.yaml --runs-dir runs", "search space 'nothing.yaml' does not exist"),
    C("unknown-field", "search s.yaml --runs-dir runs", "field 'colour'", files={"s.yaml": space(colour="red")}),
    C("unknown-nested-field", "search s.yaml --runs-dir runs", "field 'engine.colour'",
      files={"s.yaml": space(engine={"colour": "red"})}),
    C("nan-weight-bound", "search s.yaml --runs-dir runs", "field 'genome.weights.low'", "finite",
      files={"s.yaml": space(genome={"weights": {"low": float("nan"), "high": 1.0}})}),
    C("inf-weight-bound", "search s.yaml --runs-dir runs", "field 'genome.weights.high'", "finite",
      files={"s.yaml": space(genome={"weights": {"low": 0.0, "high": float("inf")}})}),
    C("reversed-weight-bounds", "search s.yaml --runs-dir runs", "bounds reversed",
      files={"s.yaml": space(genome={"weights": {"low": 2.0, "high": 1.0}})}),
    C("negative-population", "search s.yaml --runs-dir runs", "field 'engine.population'",
      files={"s.yaml": space(engine={"population": -4})}),
    C("population-10-to-the-30", "search s.yaml --runs-dir runs", "field 'engine.population'", "100000",
      files={"s.yaml": space(engine={"population": 10**30})}),
    C("weights-beyond-the-methods-bounds", "search s.yaml --runs-dir runs", "field 'genome.weights'",
      "high=20.0 is outside", "weight bounds [-10.0, 10.0]", files={"s.yaml": space(genome={"weights": {"low": 0, "high": 20}})}),
    C("weights-all-beyond-the-bounds", "search s.yaml --runs-dir runs", "field 'genome.weights'", "low=11.0",
      files={"s.yaml": space(genome={"weights": {"low": 11, "high": 20}})}),
    C("negative-items-per-task", "search s.yaml --runs-dir runs", "field 'bank.items_per_task'",
      files={"s.yaml": space(bank={"items_per_task": -5})}),
    C("nan-param-range", "search s.yaml --runs-dir runs", "field 'genome.params.ties.density.low'", "finite",
      files={"s.yaml": space(genome={"params": {"ties.density": {"low": float("nan"), "high": 0.5}}})}),
    C("negative-param-range", "search s.yaml --runs-dir runs", "genome.params.ties.density",
      "inside the method's bounds",
      files={"s.yaml": space(genome={"params": {"ties.density": {"low": -0.5, "high": 0.5}}})}),
    C("nan-fixed-value", "search s.yaml --runs-dir runs", "field 'genome.fixed'", "'ties.density' must be a finite",
      files={"s.yaml": space(genome={"fixed": {"ties.density": float("nan")}})}),
    C("negative-fixed-value", "search s.yaml --runs-dir runs", "field 'genome.fixed'", "'density' = -3",
      files={"s.yaml": space(genome={"fixed": {"ties.density": -3}})}),
    C("text-fixed-value", "search s.yaml --runs-dir runs", "field 'genome.fixed'", "'abc'",
      files={"s.yaml": space(genome={"fixed": {"ties.density": "abc"}})}),
    C("fixed-param-typo", "search s.yaml --runs-dir runs", "'ties.densty'", "no parameter 'densty'",
      files={"s.yaml": space(genome={"fixed": {"ties.densty": 0.3}})}),
    C("fixed-for-unsearched-method", "search s.yaml --runs-dir runs", "'dare.seed'", "genome.methods",
      files={"s.yaml": space(genome={"fixed": {"dare.seed": 0}})}),
    C("unknown-method", "search s.yaml --runs-dir runs", "unknown merge method 'slerpy'",
      files={"s.yaml": space(genome={"methods": ["task_arithmetic", "slerpy"]})}),
    C("unknown-device", "search s.yaml --runs-dir runs", "device 'tpu7' is not a device",
      files={"s.yaml": space(device="tpu7")}),
    C("cuda-without-cuda", "search s.yaml --runs-dir runs", "device 'cuda': CUDA is not available",
      files={"s.yaml": space(device="cuda")}, marks=NO_CUDA),
    C("unknown-fitness-strategy", "search s.yaml --runs-dir runs", "field 'bank.fitness.items'",
      files={"s.yaml": space(bank={"fitness": {"items": "bogus"}})}),
    C("adaptive-n-max-below-start", "search s.yaml --runs-dir runs", "n_max (5) is below the start size (10)",
      files={"s.yaml": space(bank={"estimator": "gp-irt", "fitness": {"items": "adaptive",
                                                                      "adaptive": {"start": 10, "n_max": 5}}})}),
    C("promotion-top-k-above-population", "search s.yaml --runs-dir runs",
      "top_k (9) is larger than the population (4)",
      files={"s.yaml": space(bank={"fitness": {"promotion": {"top_k": 9}}})}),
    C("negative-seed", "search s.yaml --runs-dir runs", "field 'seed'", files={"s.yaml": space(seed=-1)}),
    C("negative-seed-flag", "search s.yaml --runs-dir runs --seed -1", "--seed", "'-1'", files={"s.yaml": space()}),
    C("soft-weight-zero", "search s.yaml --runs-dir runs", "field 'bank.fitness.soft'",
      files={"s.yaml": space(bank={"fitness": {"items": "fresh", "soft": 0}})}),
    C("soft-with-adaptive-items", "search s.yaml --runs-dir runs", "fitness.soft ranks candidates that answered the same",
      files={"s.yaml": space(bank={"estimator": "gp-irt", "fitness": {"items": "adaptive", "soft": 1}})}),
    C("soft-without-the-mean-objective", "search s.yaml --runs-dir runs", "bank.fitness.soft adds a soft score to "
      "the 'mean' or a 'forget:<task>' objective", files={"s.yaml": space(objectives=["per_task"], bank={"fitness": {"soft": 1}})}),
    C("endpoint-twice", "search s.yaml --runs-dir runs", "field 'models'", "endpoint '@a' is listed twice",
      files={"s.yaml": space(models={"endpoints": ["@a", "@b", "@a"]})}),
    C("base-as-an-endpoint", "search s.yaml --runs-dir runs", "field 'models'", "is also an endpoint",
      files={"s.yaml": space(models={"endpoints": ["@a", "@base"]})}),
    C("method-twice", "search s.yaml --runs-dir runs", "field 'genome.methods'", "'ties' is listed twice",
      files={"s.yaml": space(genome={"methods": ["ties", "ties"]})}),
    C("endpoint-names-repeat", "search s.yaml --runs-dir runs", "field 'models'", "names gives 'x' twice",
      files={"s.yaml": space(models={"names": ["x", "x"]})}),
    C("seed-above-32-bits", "search s.yaml --runs-dir runs", "field 'seed'", "less than or equal to 4294967295",
      files={"s.yaml": space(seed=2**70)}),
    C("seed-flag-above-32-bits", "search s.yaml --runs-dir runs --seed 4294967296", "--seed",
      "in 0..4294967295", files={"s.yaml": space()}),
    C("zero-actors", "search s.yaml --runs-dir runs --actors 0", "--actors", files={"s.yaml": space()}),
    C("nan-endpoint", "search s.yaml --runs-dir runs", "@nan has 1 NaN/Inf value(s)",
      files={"s.yaml": space(models={"endpoints": ["@nan", "@b"]})}),
    C("inf-base", "search s.yaml --runs-dir runs", "@inf has 1 NaN/Inf value(s)",
      files={"s.yaml": space(models={"base": "@inf"})}),
    C("corrupt-endpoint", "search s.yaml --runs-dir runs", "cannot read safetensors file",
      files={"s.yaml": space(models={"endpoints": ["@corrupt", "@b"]})}),
    C("mis-shaped-endpoint", "search s.yaml --runs-dir runs", "'layers.1.weight' 16×20 vs 16×16",
      files={"s.yaml": space(models={"endpoints": ["@shape", "@b"]})}),
    C("endpoint-other-architecture", "search s.yaml --runs-dir runs", "'@otherarch' is not the same architecture",
      files={"s.yaml": space(models={"endpoints": ["@otherarch", "@b"]})}),
    C("base-without-config", "search s.yaml --runs-dir runs", "'@noconfig' has no config.json",
      files={"s.yaml": space(models={"base": "@noconfig"})}),
    C("endpoint-missing", "search s.yaml --runs-dir runs", "field 'models.endpoints[0]'",
      files={"s.yaml": space(models={"endpoints": ["@w/nowhere", "@b"]})}),
    C("bank-head-missing", "search s.yaml --runs-dir runs", "head file 'heads/a.safetensors'",
      files={"s.yaml": space(bank={"path": "@no_head"})}),
    C("objective-os-system", "search s.yaml --runs-dir runs", "'os:system'", "the standard library",
      files={"s.yaml": space(objectives=["os:system"])}),
    C("objective-builtins-eval", "search s.yaml --runs-dir runs", "'builtins:eval'", "the standard library",
      files={"s.yaml": space(objectives=["builtins:eval"])}),
    C("objective-subprocess", "search s.yaml --runs-dir runs", "'subprocess:run'",
      files={"s.yaml": space(objectives=["subprocess:run"])}),
    C("objective-merge3-itself", "search s.yaml --runs-dir runs", "merge3 itself",
      files={"s.yaml": space(objectives=["merge3.cli:main"])}),
    C("forget-unknown-task", "search s.yaml --runs-dir runs", "'forget:nope' names task 'nope'",
      files={"s.yaml": space(objectives=["forget:nope"])}),
    C("keep-threshold-outside", "search s.yaml --runs-dir runs", "the threshold 1.2 is outside [0, 1]",
      files={"s.yaml": space(objectives=["mean", "keep:a>=1.2"])}),
    C("keep-only", "search s.yaml --runs-dir runs", "keep:… entries are constraints",
      files={"s.yaml": space(objectives=["keep:a>=0.5"])}),
    C("objective-not-a-path", "search s.yaml --runs-dir runs", "objective 'mean; rm'",
      files={"s.yaml": space(objectives=["mean; rm"])}),
    C("objective-in-working-folder", "search s.yaml --runs-dir runs", "cannot import 'cwd_objective:f'",
      files={"s.yaml": space(objectives=["cwd_objective:f"]),
             "cwd_objective.py": "open('imported.txt', 'w').write('ran')\ndef f(r):\n    return 1.0\n"}),
    C("objective-raises-at-import", "search s.yaml --runs-dir runs", "importing 'obj_import_raises' failed",
      "boom at import", files={"s.yaml": space(objectives=["obj_import_raises:f"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-module-exits", "search s.yaml --runs-dir runs", "importing 'obj_exit' failed", "SystemExit: 3",
      files={"s.yaml": space(objectives=["obj_exit:f"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-module-exits-0", "search s.yaml --runs-dir runs", "importing 'obj_exit0' failed",
      files={"s.yaml": space(objectives=["obj_exit0:f"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-takes-no-argument", "search s.yaml --runs-dir runs", "'obj_fns:no_arg' must take one argument",
      files={"s.yaml": space(objectives=["obj_fns:no_arg"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-raises-when-called", "search s.yaml --runs-dir runs", "objective 'obj_fns:raises' failed",
      "bad candidate", files={"s.yaml": space(objectives=["obj_fns:raises"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-returns-nan", "search s.yaml --runs-dir runs", "objective 'obj_fns:nan' returned nan",
      files={"s.yaml": space(objectives=["obj_fns:nan"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-returns-text", "search s.yaml --runs-dir runs", "objective 'obj_fns:text' failed",
      files={"s.yaml": space(objectives=["obj_fns:text"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-exits-when-called", "search s.yaml --runs-dir runs", "objective 'obj_fns:exits' failed",
      files={"s.yaml": space(objectives=["obj_fns:exits"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-not-callable", "search s.yaml --runs-dir runs", "'obj_fns:not_callable' is not callable",
      files={"s.yaml": space(objectives=["obj_fns:not_callable"])}, env={"PYTHONPATH": "@mods"}),
    C("objective-missing", "search s.yaml --runs-dir runs", "cannot import 'obj_fns:nope'",
      files={"s.yaml": space(objectives=["obj_fns:nope"])}, env={"PYTHONPATH": "@mods"}),
    C("runs-dir-is-a-file", "search s.yaml --runs-dir mine.txt", "'mine.txt' is a file",
      files={"s.yaml": space(), "mine.txt": "notes"}),
    C("run-name-escapes", "search s.yaml --runs-dir runs --name ../escape", "run name '../escape'",
      files={"s.yaml": space()}),
    C("run-name-taken", "search s.yaml --runs-dir runs --name good", "run 'runs/good' already exists",
      files={"s.yaml": space()}, setup=lambda a, w: shutil.copytree(a["run"], w / "runs" / "good")),
    C("bank-head-mis-shaped", "search s.yaml --runs-dir runs", "heads/a.safetensors",
      files={"s.yaml": space(bank={"path": "@wide_head"})}),
]


@pytest.mark.parametrize("case", SEARCH)
def test_search(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


# ---- compress: skill packs -------------------------------------------------------------------------------------------

def _packs(paths, work):
    from merge3.models import compress_models

    compress_models(paths["base"], {"a": paths["a"], "b": paths["b"]}, work / "packs", rank=2)


def _damaged_pack(mutate):
    def setup(paths, work):
        _packs(paths, work)
        mutate(work / "packs" / "a")
    return setup


def _drop_layer(pack):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(pack / "factors.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("layers.1.weight")}
    save_file(kept, str(pack / "factors.safetensors"))


def _other_base(pack):
    info = json.loads((pack / "pack.json").read_text())
    info["base"]["sha256"] = "0" * 64
    (pack / "pack.json").write_text(json.dumps(info))


def _pack_merge(model="packs/a"):
    return f"merge_method: task_arithmetic\nbase_model: @base\nmodels:\n  - {{model: {model}, parameters: {{weight: 1}}}}\n"


COMPRESS = [
    C("rank-zero", "compress @base @a @b --out packs --rank 0", "--rank 0: a rank must be a positive integer"),
    C("rank-negative", "compress @base @a @b --out packs --rank -2", "--rank -2: a rank must be a positive integer"),
    C("rank-above-every-layer", "compress @base @a @b --out packs --rank 17", "--rank 17 is above the rank of every",
      "'layers.1.weight', rank 16"),
    C("energy-zero", "compress @base @a @b --out packs --energy 0", "--energy 0.0 is outside (0, 1]"),
    C("energy-above-one", "compress @base @a @b --out packs --energy 1.5", "--energy 1.5 is outside (0, 1]"),
    C("energy-nan", "compress @base @a @b --out packs --energy nan", "--energy nan is outside (0, 1]"),
    C("rank-and-energy", "compress @base @a @b --out packs --rank 2 --energy 0.5", "not allowed with argument"),
    C("names-mismatch", "compress @base @a @b --out packs --names x", "--names: give one distinct name per model"),
    C("names-repeat", "compress @base @a @b --out packs --names x,x", "--names: give one distinct name per model",
      "'x' comes twice"),
    C("names-reach-outside-out", "compress @base @a @b --out packs --names ../../evil,b",
      "task name '../../evil' is not a plain folder name"),
    C("names-one-empty", "compress @base @a @b --out packs --names x,", "--names: give one distinct name per model",
      "(one is empty)"),
    C("names-with-a-slash", "compress @base @a @b --out packs --names x/y,b", "'x/y' is not a plain folder name"),
    C("same-model-twice", "compress @base @a @a --out packs", "'a' comes twice (as a folder name)"),
    C("nan-model", "compress @base @nan --out packs", "@nan has 1 NaN/Inf value(s)"),
    C("mis-shaped-model", "compress @base @shape --out packs", "'layers.1.weight' 16×20 vs 16×16"),
    C("out-exists", "compress @base @a --out mine", "'mine' already exists and is not empty",
      files={"mine/notes.txt": "mine"}),
    C("pack-missing-a-layer", "eval packs/a --bank @bank", "skill pack 'packs/a' is missing layer 'layers.1.weight'",
      setup=_damaged_pack(_drop_layer)),
    C("pack-base-changed", "eval packs/a --bank @bank", "has changed since the pack was made",
      setup=_damaged_pack(_other_base)),
    C("pack-manifest-corrupt", "eval packs/a --bank @bank", "pack.json cannot be read",
      setup=_damaged_pack(lambda pack: (pack / "pack.json").write_text("{"))),
    C("pack-with-another-base", "merge m.yaml --out out", "skill pack '@w/packs/a' was made from another base",
      files={"m.yaml": _pack_merge("@w/packs/a").replace("@base", "@a")}, setup=_packs),
    C("route-not-a-pack", "route @a @b --out r", "'@a' is not a skill pack (no pack.json)"),
    C("route-one-pack", "route packs/a --out r", "route: give at least two skill packs", setup=_packs),
    C("route-layer-not-in-packs", "route packs/a packs/b --out r --layer layers.7",
      "--layer 'layers.7': the packs hold no factors", setup=_packs),
    C("route-names-count", "route packs/a packs/b --out r --names x", "--names: give one distinct name per pack",
      setup=_packs),
    C("route-names-reach-outside-out", "route packs/a packs/b --out r --names ../../evil,b",
      "route: task name '../../evil' is not a plain folder name", setup=_packs),
    C("route-out-exists", "route packs/a packs/b --out mine", "'mine' already exists and is not empty",
      files={"mine/notes.txt": "mine"}, setup=_packs),
    C("pack-without-a-base", "merge m.yaml --out out", "skill pack '@w/packs/a' is a task vector: it needs its base",
      files={"m.yaml": "merge_method: linear\nmodels:\n  - {model: @w/packs/a}\n  - {model: @b}\n"}, setup=_packs),
]


@pytest.mark.parametrize("case", COMPRESS)
def test_compress(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


# ---- federate: bad federated configs and runs -----------------------------------------------------------------------

def fed(**over) -> str:
    """A federated YAML: two clients, one round of two steps on a tiny MLP, with ``over`` merged in."""
    config = {"name": "f", "rounds": 1, "data": {"clients": ["upright", "rot90"], "samples_per_client": 20},
              "model": {"sizes": [64, 8, 10]}, "local": {"steps": 2}}
    return yaml.safe_dump(_merge(config, over), sort_keys=False)


def _finished_federated_run(paths, work):
    from merge3.federated import federate

    (work / "f.yaml").write_text(fed())
    federate(work / "f.yaml", runs_dir=work / "runs", name="done", log=lambda *a: None)


def _federated_run_edited(mutate: Callable[[Path], None]):
    """A setup: a finished federated run ``runs/done``, marked interrupted, then ``mutate``d."""
    def setup(paths, work):
        _finished_federated_run(paths, work)
        run = work / "runs" / "done"
        meta = json.loads((run / "federation.json").read_text())
        (run / "federation.json").write_text(json.dumps({**meta, "status": "interrupted"}))
        mutate(run)
    return setup


def _linked_outside(name: str):
    """A mutation: the run's ``name`` replaced by a symbolic link to a user's file outside the run (which resume
    would otherwise truncate or append to: the snapshot checks it is untouched)."""
    def mutate(run: Path, paths: dict | None = None):
        victim = run.parent / f"users-{name.strip('.')}.txt"
        victim.write_bytes((run / name).read_bytes() if (run / name).exists() else b"a user's notes\n")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    return mutate


FEDERATE = [
    C("zero-clients", "federate f.yaml", "field 'data.clients'", files={"f.yaml": fed(data={"clients": []})}),
    C("zero-rounds", "federate f.yaml", "field 'rounds'", "greater than or equal to 1",
      files={"f.yaml": fed(rounds=0)}),
    C("unknown-domain", "federate f.yaml", "unknown digits domain 'sideways'",
      files={"f.yaml": fed(data={"clients": ["upright", "sideways"]})}),
    C("repeated-domain", "federate f.yaml", "clients repeat a domain",
      files={"f.yaml": fed(data={"clients": ["upright", "upright"]})}),
    C("too-few-samples", "federate f.yaml", "field 'data.samples_per_client'",
      files={"f.yaml": fed(data={"samples_per_client": 3})}),
    C("model-not-digits-shaped", "federate f.yaml", "field 'model.sizes'", "64 inputs, 10 outputs",
      files={"f.yaml": fed(model={"sizes": [32, 8, 10]})}),
    C("unknown-method", "federate f.yaml", "field 'aggregate'", "unknown merge method 'slerpy'",
      files={"f.yaml": fed(aggregate={"method": "slerpy"})}),
    C("method-param-out-of-range", "federate f.yaml", "'density' = 1.5 is out of range",
      files={"f.yaml": fed(aggregate={"method": "ties", "params": {"density": 1.5}})}),
    C("params-for-three-clients-of-two", "federate f.yaml", "field 'aggregate.params'", "3 values for 2 models",
      "one per client", files={"f.yaml": fed(aggregate={"method": "task_arithmetic", "params": {"weights": [1, 2, 3]}})}),
    C("search-weights-reversed", "federate f.yaml", "field 'aggregate.search.weights'", "bounds reversed",
      files={"f.yaml": fed(aggregate={"search": {"weights": [1.0, 0.0]}})}),
    C("search-weights-beyond-the-bounds", "federate f.yaml", "field 'aggregate.search.weights'", "is outside",
      files={"f.yaml": fed(aggregate={"search": {"weights": [0.0, 1e300]}})}),
    C("search-population-10-to-the-30", "federate f.yaml", "field 'aggregate.search.population'",
      files={"f.yaml": fed(aggregate={"search": {"population": 10**30}})}),
    C("unknown-search-method", "federate f.yaml", "field 'aggregate.search.methods'",
      files={"f.yaml": fed(aggregate={"search": {"methods": ["slerpy"]}})}),
    C("compress-rank-zero", "federate f.yaml", "field 'compress.rank'", files={"f.yaml": fed(compress={"rank": 0})}),
    C("compress-energy-above-one", "federate f.yaml", "field 'compress.energy'",
      files={"f.yaml": fed(compress={"energy": 1.5})}),
    C("compress-rank-and-energy", "federate f.yaml", "give exactly one of rank and energy",
      files={"f.yaml": fed(compress={"rank": 2, "energy": 0.9})}),
    C("independent-init-averaged", "federate f.yaml", "aggregate.method must be a same-task method",
      files={"f.yaml": fed(model={"init": "independent"})}),
    C("init-of-other-sizes", "federate f.yaml", "field 'model.init'", "is not an MLP of sizes [64, 8, 10]",
      files={"f.yaml": fed(model={"init": "@base"})}),
    C("init-missing", "federate f.yaml", "'@w/nowhere' does not exist",
      files={"f.yaml": fed(model={"init": "@w/nowhere"})}),
    C("negative-seed", "federate f.yaml", "field 'seed'", files={"f.yaml": fed(seed=-1)}),
    C("seed-above-32-bits", "federate f.yaml", "field 'seed'", files={"f.yaml": fed(seed=2**40)}),
    C("method-and-search", "federate f.yaml", "field 'aggregate'", "give 'search' or 'method', not both",
      files={"f.yaml": fed(aggregate={"method": "ties", "search": {"methods": ["task_arithmetic"]}})}),
    C("model-too-big-to-allocate", "federate f.yaml", "field 'model.sizes'", "75,000,000,010 parameters",
      files={"f.yaml": fed(model={"sizes": [64, 1_000_000_000, 10]})}),
    C("unknown-field", "federate f.yaml", "field 'colour'", files={"f.yaml": fed(colour="red")}),
    C("not-a-mapping", "federate f.yaml", "f.yaml' must be a mapping", files={"f.yaml": "- a\n"}),
    C("config-missing", "federate nothing.yaml", "'nothing.yaml' does not exist"),
    C("config-and-resume", "federate f.yaml --resume @run", "not both", files={"f.yaml": fed()}),
    C("neither-config-nor-resume", "federate", "give a config"),
    C("runs-dir-is-a-file", "federate f.yaml --runs-dir mine.txt", "'mine.txt' is a file",
      files={"f.yaml": fed(), "mine.txt": "notes"}),
    C("run-name-escapes", "federate f.yaml --name ../escape", "run name '../escape'", files={"f.yaml": fed()}),
    C("run-name-taken", "federate f.yaml --name taken", "run 'runs/taken' already exists",
      files={"f.yaml": fed(), "runs/taken/notes.txt": "mine"}),
    C("resume-a-search-run", "federate --resume @run", "is not a merge3 federated run folder"),
    C("resume-finished", "federate --resume runs/done", "federated run 'runs/done' has already finished",
      setup=_finished_federated_run),
    C("resume-meta-a-list", "federate --resume runs/done", "federation.json: not a federation record",
      setup=_federated_run_edited(lambda run: (run / "federation.json").write_text("[]"))),
    C("resume-rounds-emptied", "federate --resume runs/done", "rounds.jsonl holds no finished round",
      setup=_federated_run_edited(lambda run: (run / "rounds.jsonl").write_text(""))),
    *[C(f"resume-{name.strip('.')}-a-link-outside", "federate --resume runs/done",
        f"'runs/done/{name}' is a symbolic link", setup=_federated_run_edited(_linked_outside(name)))
      for name in (".lock", "rounds.jsonl", "log.txt")],
    C("resume-rounds-a-list-line", "federate --resume runs/done", "rounds.jsonl holds no finished round",
      setup=_federated_run_edited(lambda run: (run / "rounds.jsonl").write_text("[1]\n"))),
]


@pytest.mark.parametrize("case", FEDERATE)
def test_federate(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


# ---- runs: resume, verify, export, report, leaderboard on damaged runs ---------------------------------------------

def _run_copy(mutate: Callable[[Path, dict], None] | None = None, status: str | None = "interrupted"):
    """A setup: the good run copied to ``run`` (marked ``status`` so that resume would go on), then ``mutate``d."""
    def setup(paths, work):
        run = work / "run"
        shutil.copytree(paths["run"], run)
        if status is not None:
            meta = json.loads((run / "run.json").read_text())
            (run / "run.json").write_text(json.dumps({**meta, "status": status}))
        if mutate is not None:
            mutate(run, paths)
    return setup


def _write(name: str, data: str | bytes):
    def mutate(run: Path, paths: dict):
        (run / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return mutate


def _line(n: int, text: str | Callable[[dict], dict]):
    def mutate(run: Path, paths: dict | None = None):
        lines = (run / "evaluations.jsonl").read_text().splitlines(keepends=True)
        lines[n] = text if isinstance(text, str) else json.dumps(text(json.loads(lines[n]))) + "\n"
        (run / "evaluations.jsonl").write_text("".join(lines))
    return mutate


def _config(**models):
    def mutate(run: Path, paths: dict):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["models"].update(_subst(models, paths))
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return mutate


CORRUPT = {
    "run-json": (_write("run.json", '{"status": "runn'), "run/run.json: unreadable"),
    "run-json-a-list": (_write("run.json", "[]"), "run/run.json: not a merge3 run.json"),
    "config-yaml": (_write("config.yaml", "models: [\n"), "run/config.yaml: unreadable"),
    "config-yaml-empty": (_write("config.yaml", ""), "run/config.yaml: not a merge3 run config"),
    "config-yaml-deep": (_write("config.yaml", "a: " + "[" * 1000 + "]" * 1000 + "\n"),
                         "run/config.yaml: unreadable (YamlTooDeep: is nested too deeply to read)"),
    "evaluations-middle-line": (_line(3, '{"generation": 0, "ind\n'), "run/evaluations.jsonl: line 4 is corrupt"),
    "evaluations-not-a-record": (_line(2, "[1, 2]\n"), "run/evaluations.jsonl: line 3 is not an evaluation record"),
    "evaluations-wrong-types": (_line(2, lambda r: {**r, "generation": "zz", "objectives": "x"}),
                                "run/evaluations.jsonl: line 3 is not an evaluation record"),
    "evaluations-not-utf8": (_write("evaluations.jsonl", b"\xff\xfe\x00"), "run/evaluations.jsonl: unreadable"),
    "evaluations-no-objectives": (_line(2, lambda r: {**r, "objectives": []}),
                                  "run/evaluations.jsonl: line 3 is not an evaluation record"),
    "evaluations-text-score": (_line(2, lambda r: {**r, "scores": {"a": "x", "b": None}}),
                               "run/evaluations.jsonl: line 3 is not an evaluation record"),
    "verified-text-score": (_write("verified.json", json.dumps({"0/0": {"test": {"a": "high"}, "test_mean": 0.5}})),
                            "run/verified.json: entry '0/0' field 'test' is not a mapping of task → accuracy"),
    "verified-impossible-score": (_write("verified.json", json.dumps({"0/0": {"test": {"a": 7.5}}})),
                                  "run/verified.json: entry '0/0' field 'test'"),
    "verified-nan-mean": (_write("verified.json", '{"0/0": {"test": null, "test_mean": NaN}}'),
                          "run/verified.json: entry '0/0' field 'test_mean' is NaN, not an accuracy in [0, 1]"),
    "verified-not-a-record": (_write("verified.json", '{"0/0": [1]}'),
                              "run/verified.json: entry '0/0' is not a verification record"),
    "evaluations-three-objectives": (_line(2, lambda r: {**r, "objectives": [0.1, 0.2, 0.3]}),
                                     "run/evaluations.jsonl: line 3 has 3 objectives where line 1 has 1"),
}

RUNS = [
    *[C(f"resume-{name}", "resume run --quiet", message, setup=_run_copy(mutate))
      for name, (mutate, message) in CORRUPT.items() if not name.startswith("verified")],  # resume never reads it
    *[C(f"export-{name}", "export run --out out", message, setup=_run_copy(mutate))
      for name, (mutate, message) in CORRUPT.items() if name.startswith(("config", "evaluations", "verified"))],
    *[C(f"report-{name}", "report run", message, setup=_run_copy(mutate))
      for name, (mutate, message) in CORRUPT.items() if not name.startswith("evaluations-not-a")],
    C("verify-evaluations-middle-line", "verify run", "line 4 is corrupt",
      setup=_run_copy(CORRUPT["evaluations-middle-line"][0])),
    C("verify-config-yaml", "verify run", "run/config.yaml: unreadable", setup=_run_copy(CORRUPT["config-yaml"][0])),
    C("resume-finished-run", "resume run --quiet", "run 'run' has already finished", setup=_run_copy(status=None)),
    C("search-runs-dir-a-dangling-link", "search s.yaml --runs-dir link", "--runs-dir 'link' cannot be made",
      files={"s.yaml": space()}, setup=lambda paths, work: (work / "link").symlink_to(work / "nowhere")),
    C("resume-a-file", "resume mine.txt", "'mine.txt' is not a merge3 run folder", files={"mine.txt": "notes"}),
    C("resume-a-model-folder", "resume @base", "is not a merge3 run folder"),
    C("resume-lock-is-a-folder", "resume run --quiet", "run/.lock",
      setup=_run_copy(lambda run, paths: ((run / ".lock").unlink(), (run / ".lock").mkdir()))),
    *[C(f"resume-{name.strip('.')}-a-link-outside", "resume run --quiet", f"'run/{name}' is a symbolic link",
        setup=_run_copy(_linked_outside(name))) for name in (".lock", "evaluations.jsonl", "log.txt")],
    C("resume-endpoint-gone", "resume run --quiet", "'@w/nowhere' does not exist",
      setup=_run_copy(_config(endpoints=["@w/nowhere", "@b"]))),
    C("resume-endpoint-now-nan", "resume run --quiet", "@nan has 1 NaN/Inf value(s)",
      setup=_run_copy(_config(endpoints=["@nan", "@b"]))),
    C("export-endpoint-now-nan", "export run --out out", "@nan has 1 NaN/Inf value(s)",
      setup=_run_copy(_config(endpoints=["@nan", "@b"]), status=None)),
    C("verify-top-0", "verify @run --top 0", "--top", "'0'"),
    C("export-rank-0", "export @run --out out --rank 0", "--rank 0 is out of range: ranks start at 1"),
    C("export-rank-negative", "export @run --out out --rank -1", "--rank -1 is out of range"),
    C("export-rank-999", "export @run --out out --rank 999", "--rank 999 is out of range", "has 12 candidate(s)"),  # 8 recipes, then 4
    C("export-out-exists-non-empty", "export @run --out mine", "'mine' already exists and is not empty",
      files={"mine/keep.txt": "mine"}),
    C("export-out-is-a-file", "export @run --out mine.txt", "'mine.txt' is a file", files={"mine.txt": "notes"}),
    C("export-out-parent-is-a-file", "export @run --out mine.txt/out", "'mine.txt' is a file",
      files={"mine.txt": "notes"}),
    C("export-not-a-run", "export @base --out out", "is not a merge3 run folder"),
    C("leaderboard-out-is-a-folder", "leaderboard @run --format csv --out mine --no-baselines",
      "'mine' is a folder, not a file", files={"mine/keep.txt": "mine"}),
    C("leaderboard-out-parent-is-a-file", "leaderboard @run --format csv --out mine.txt/board.csv --no-baselines",
      "'mine.txt' is a file", files={"mine.txt": "notes"}),
    C("leaderboard-out-without-format", "leaderboard @run --out board.txt --no-baselines", "--out needs --format"),
    C("leaderboard-out-exists", "leaderboard @run --format csv --out board.csv --no-baselines",
      "--out 'board.csv' already exists (give --force to replace it)", files={"board.csv": "my own notes"}),
    C("report-with-no-readable-evaluation", "report run", "has no readable evaluation", "report.html is kept",
      setup=_run_copy(lambda run, paths: (run / "evaluations.jsonl").write_text('{"generation": 0, "ind'))),
    C("leaderboard-missing-folder", "leaderboard nowhere", "'nowhere' does not exist"),
    C("leaderboard-a-file", "leaderboard mine.txt", "'mine.txt' is neither a run folder", files={"mine.txt": "x"}),
    C("leaderboard-unknown-task", "leaderboard @run --task zzz --no-baselines", "--task 'zzz'"),
    C("leaderboard-top-negative", "leaderboard @run --top -1", "--top"),
]


@pytest.mark.parametrize("case", RUNS)
def test_runs(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


@pytest.mark.parametrize("damage", ["evaluations-middle-line", "verified-impossible-score", "verified-nan-mean"])
def test_leaderboard_skips_a_corrupt_run_with_one_warning(damage, assets, runner, tmp_path):
    runs = tmp_path / "runs"
    for name in ("first", "second", "broken"):
        shutil.copytree(assets["run"], runs / name)
    mutate, message = CORRUPT[damage]
    mutate(runs / "broken", {})
    before = snapshot(tmp_path)
    for fmt in ("csv", "table"):
        out = runner(["leaderboard", "runs", "--format", fmt, "--no-baselines"], tmp_path, {})
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        (warning,) = out.stderr.splitlines()
        assert warning.startswith("warning: skipping run broken: runs/broken/") and message[len("run/"):] in warning
        assert "first" in out.stdout and "second" in out.stdout and "broken" not in out.stdout
    csv = runner(["leaderboard", "runs", "--format", "csv", "--no-baselines"], tmp_path, {}).stdout
    board = pd.read_csv(io.StringIO(csv))
    assert set(board["run"]) == {"first", "second"}, "stdout is the board alone: warnings go to stderr"
    assert snapshot(tmp_path) == before


def test_a_run_named_twice_is_one_run_on_the_leaderboard(assets, runner, tmp_path):
    shutil.copytree(assets["run"], tmp_path / "runs" / "good")
    args = ["leaderboard", "--format", "csv", "--no-baselines"]
    once = pd.read_csv(io.StringIO(runner([*args[:1], "runs/good", *args[1:]], tmp_path, {}).stdout))
    out = runner([*args[:1], "runs/good", "runs", "./runs/good/", *args[1:]], tmp_path, {})
    assert out.returncode == 0, out.stderr
    assert len(pd.read_csv(io.StringIO(out.stdout))) == len(once) > 0


# ---- runs under concurrent writers and signals (real processes) ---------------------------------------------------

def _interruptible() -> None:
    """In the child before it runs: Ctrl-C as a terminal delivers it. A shell's background job (CI launched with
    `&`) starts with SIGINT ignored, which every child inherits, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "merge3", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, **(env or {})}, cwd=cwd, preexec_fn=_interruptible)


def _candidates(generations: int) -> int:
    """What the 4-candidate space evaluates: its 8 uniform recipes in generation 0, then 4 per generation."""
    return 8 + 4 * (generations - 1)


def _keys(run: Path) -> list[tuple]:
    lines = (run / "evaluations.jsonl").read_text().splitlines()
    return [(r["generation"], r["index"], r.get("rung", 0)) for r in map(json.loads, lines)]


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


def test_two_writers_one_run(assets, runner, tmp_path):
    # 160 candidates that each sleep 50 ms: the first writer is still at work when the second one starts
    (tmp_path / "s.yaml").write_text(_subst(space(engine={"generations": 40}, objectives=["obj_fns:slow_mean"]), assets))
    first = _popen(["search", "s.yaml", "--runs-dir", "runs", "--name", "busy", "--quiet"], tmp_path,
                   {"PYTHONPATH": assets["mods"]})
    run = tmp_path / "runs" / "busy"
    wait_for_lines(run / "evaluations.jsonl", 4, first)
    before = live_snapshot(run)
    second = runner(["resume", "runs/busy", "--quiet"], tmp_path, {"PYTHONPATH": assets["mods"]})
    assert first.poll() is None, "the first search ended before the second writer came"
    one_error(second, 2, "run 'runs/busy' is being written by", f"pid {first.pid}")
    after = live_snapshot(run)
    assert set(after) >= set(before) and after[".lock"] == before[".lock"], "the second writer touched the lock"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    keys = _keys(run)
    assert len(keys) == len(set(keys)) == _candidates(40), "no (generation, index, rung) recorded twice"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / ".lock").read_text() == ""
    _no_temporaries(tmp_path)


def test_sigkill_then_resume_takes_the_lock_over(assets, runner, tmp_path):
    (tmp_path / "s.yaml").write_text(_subst(space(engine={"generations": 30}), assets))
    proc = _popen(["search", "s.yaml", "--runs-dir", "runs", "--name", "killed", "--quiet"], tmp_path)
    run = tmp_path / "runs" / "killed"
    wait_for_lines(run / "evaluations.jsonl", 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid, "a dead writer leaves its name in the lock"
    assert len(_keys(run)) < _candidates(30), "the kill landed mid-run"
    out = runner(["resume", "runs/killed", "--quiet"], tmp_path, {})
    assert out.returncode == 0, out.stderr
    assert f"took over the lock of pid {proc.pid}" in (run / "log.txt").read_text()
    keys = _keys(run)
    assert len(keys) == len(set(keys)) == _candidates(30)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    _no_temporaries(tmp_path)


def test_a_lock_edited_into_a_list_is_taken_over(assets, runner, tmp_path):
    _run_copy(_write(".lock", "[1, 2]"))(assets, tmp_path)
    out = runner(["resume", "run", "--quiet"], tmp_path, {})
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_an_output_folder_made_while_merging_is_kept_and_nothing_is_written(tmp_path):
    from merge3 import Merge3Error
    from merge3.models import atomic_dir

    with pytest.raises(Merge3Error, match="'.*out' appeared while merge3 was writing it"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_text("merged")
            (tmp_path / "out").mkdir()  # another run, or the user, made it meanwhile
            (tmp_path / "out" / "notes.txt").write_text("mine")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "out"]
    with atomic_dir(tmp_path / "empty") as tmp:  # an empty folder made meanwhile is replaced, as at the start
        (tmp / "model.safetensors").write_text("merged")
        (tmp_path / "empty").mkdir()
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("sig, rc, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                            (signal.SIGINT, 130, "interrupted (Ctrl-C)")], ids=["sigterm", "sigint"])
def test_a_stopped_search_is_marked_interrupted_and_resumable(sig, rc, said, assets, runner, tmp_path):
    (tmp_path / "s.yaml").write_text(_subst(space(engine={"generations": 30}), assets))
    proc = _popen(["search", "s.yaml", "--runs-dir", "runs", "--name", "stopped", "--quiet"], tmp_path)
    run = tmp_path / "runs" / "stopped"
    wait_for_lines(run / "evaluations.jsonl", 4, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == rc and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and said in errors[0] and "merge3 resume" in errors[0], stderr
    assert stderr.splitlines()[-1] == errors[0]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted" and (run / ".lock").read_text() == ""
    assert len(_keys(run)) < _candidates(30)
    _no_temporaries(tmp_path)
    out = runner(["resume", "runs/stopped", "--quiet"], tmp_path, {})
    assert out.returncode == 0, out.stderr
    keys = _keys(run)
    assert len(keys) == len(set(keys)) == _candidates(30)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


STARTUP_FAILURES = {
    "nan-endpoint": ({"models": {"endpoints": ["@nan", "@b"]}}, "NaN/Inf", {}),
    "missing-head-file": ({"bank": {"path": "@no_head"}}, "head file 'heads/a.safetensors'", {}),
    "unusable-device": ({"device": "tpu7"}, "device 'tpu7'", {}),
    "objective-fails-on-the-first-candidate": ({"objectives": ["obj_fns:raises"]}, "bad candidate",
                                               {"PYTHONPATH": "@mods"}),
}


@pytest.mark.parametrize("kind", STARTUP_FAILURES)
def test_a_search_that_fails_at_start_up_leaves_no_run_and_the_name_stays_free(kind, assets, runner, tmp_path):
    over, message, env = STARTUP_FAILURES[kind]
    (tmp_path / "bad.yaml").write_text(_subst(space(**over), assets))
    (tmp_path / "good.yaml").write_text(_subst(space(), assets))
    (tmp_path / "runs").mkdir()
    failed = runner(["search", "bad.yaml", "--runs-dir", "runs", "--name", "mine", "--quiet"], tmp_path,
                    _subst(env, assets))
    one_error(failed, 2, message)
    assert list((tmp_path / "runs").iterdir()) == []
    retry = runner(["search", "good.yaml", "--runs-dir", "runs", "--name", "mine", "--quiet"], tmp_path, {})
    assert retry.returncode == 0, retry.stderr
    assert json.loads((tmp_path / "runs" / "mine" / "run.json").read_text())["status"] == "finished"


# ---- banks ----------------------------------------------------------------------------------------------------------

def _bank_copy(paths: dict, work: Path) -> None:
    shutil.copytree(paths["bank"], work / "bank")


def _unsplit_bank(paths: dict, work: Path) -> None:
    from merge3.itembank import BankSpec, write_bank

    spec = BankSpec(name="tiny", tasks=["a", "b"], evaluator={"kind": "classifier"})
    write_bank(work / "bank", spec, _items())


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


MC = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
def _bank_yaml_edit(change: Callable[[dict], dict]):
    def setup(paths: dict, work: Path) -> None:
        _bank_copy(paths, work)
        spec = yaml.safe_load((work / "bank" / "bank.yaml").read_text())
        (work / "bank" / "bank.yaml").write_text(yaml.safe_dump(change(spec)))
    return setup


BANKS = [
    C("bank-yaml-task-twice", "eval @base --bank bank", "field 'tasks'", "'a' is listed twice",
      setup=_bank_yaml_edit(lambda spec: {**spec, "tasks": ["a", "b", "a"]})),
    C("split-fraction-0", "bank split bank --test-fraction 0", "test_fraction must be in (0, 0.9], got 0.0",
      setup=_unsplit_bank),
    C("split-fraction-1.5", "bank split bank --test-fraction 1.5", "got 1.5", setup=_unsplit_bank),
    C("split-fraction-nan", "bank split bank --test-fraction nan", "got nan", setup=_unsplit_bank),
    C("split-fraction-inf", "bank split bank --test-fraction inf", "got inf", setup=_unsplit_bank),
    C("split-fraction-text", "bank split bank --test-fraction abc", "--test-fraction", "'abc'", setup=_unsplit_bank),
    C("split-negative-seed", "bank split bank --test-fraction 0.3 --seed -1", "--seed", setup=_unsplit_bank),
    C("split-already-split", "bank split bank --test-fraction 0.3", "item bank 'bank' is already split",
      setup=_bank_copy),
    C("split-not-a-bank", "bank split @base --test-fraction 0.3", "has no bank.yaml"),
    C("from-file-missing-column", "bank from-file q.jsonl --out new", "q.jsonl: no column 'question' or 'prompt'",
      files={"q.jsonl": _jsonl({"q": "2+2?", "choices": ["3", "4"], "answer": 1})}),
    C("from-file-missing-answer-column", "bank from-file q.jsonl --out new", "q.jsonl: no column 'answer'",
      files={"q.jsonl": _jsonl({"question": "2+2?", "choices": ["3", "4"]})}),
    C("from-file-answer-out-of-range", "bank from-file q.jsonl --out new",
      "q.jsonl, row 2: answer index 5 is out of range",
      files={"q.jsonl": _jsonl(MC, {**MC, "answer": 5})}),
    C("from-file-negative-answer", "bank from-file q.jsonl --out new", "answer index -1 is out of range",
      files={"q.jsonl": _jsonl({**MC, "answer": -1})}),
    C("from-file-empty-prompt", "bank from-file q.jsonl --out new", "q.jsonl, row 1: empty prompt",
      files={"q.jsonl": _jsonl({**MC, "question": "  "})}),
    C("from-file-broken-jsonl", "bank from-file q.jsonl --out new", "cannot read items file 'q.jsonl'",
      files={"q.jsonl": _jsonl(MC) + "{broken\n"}),
    C("from-file-missing-file", "bank from-file nowhere.jsonl --out new", "'nowhere.jsonl' does not exist"),
    C("from-file-fraction-1.5", "bank from-file q.jsonl --out new --test-fraction 1.5", "got 1.5",
      files={"q.jsonl": _jsonl(MC, MC)}),
    C("from-file-zero-batch", "bank from-file q.jsonl --out new --batch-size 0", "--batch-size",
      files={"q.jsonl": _jsonl(MC)}),
    C("from-file-out-is-a-file", "bank from-file q.jsonl --out mine.txt", "'mine.txt' is a file",
      files={"q.jsonl": _jsonl(MC), "mine.txt": "notes"}),
    C("from-file-out-is-my-folder", "bank from-file q.jsonl --out mine", "'mine' exists and is not an item bank",
      files={"q.jsonl": _jsonl(MC), "mine/thesis.tex": "years of work"}),
    C("from-file-empty-file", "bank from-file q.jsonl --out new", "q.jsonl", files={"q.jsonl": ""}),
    C("from-file-not-utf8", "bank from-file q.jsonl --out new", "items file 'q.jsonl' is not UTF-8 text",
      files={"q.jsonl": _jsonl(MC).encode() + b'{"question": "\xff?"}\n'}),
    C("from-file-template-format-spec", "bank from-file q.jsonl --out new --template {question:>99999999999}",
      "template field {question:>99999999999} has a format spec", files={"q.jsonl": _jsonl(MC)}),
    C("from-file-choice-twice", "bank from-file q.jsonl --out new", "q.jsonl, row 1: the choice '4' is given twice",
      files={"q.jsonl": _jsonl({**MC, "choices": ["4", "3", "4"]})}),
    C("from-file-generation-empty-answer", "bank from-file q.jsonl --out new", "q.jsonl, row 2: empty answer",
      files={"q.jsonl": _jsonl({"prompt": "2+2=", "answer": "4"}, {"prompt": "3+3=", "answer": " "})}),
    C("from-file-tokenizer-missing", "bank from-file q.jsonl --out new --tokenizer nowhere",
      "tokenizer 'nowhere' does not exist", files={"q.jsonl": _jsonl(MC)}),
    C("from-file-template-conversion", "bank from-file q.jsonl --out new --template Q:{question!r}",
      "template field {question!r} has a format spec or conversion", files={"q.jsonl": _jsonl(MC)}),
    C("from-file-same-stem", "bank from-file q.jsonl more/q.jsonl --out new",
      "files 'q.jsonl' and 'more/q.jsonl' are both task 'q' (the stem of both names)",
      files={"q.jsonl": _jsonl(MC), "more/q.jsonl": _jsonl(MC)}),
    C("from-file-same-task-name", "bank from-file q.jsonl r.jsonl --task t --task t --out new",
      "files 'q.jsonl' and 'r.jsonl' are both task 't'", files={"q.jsonl": _jsonl(MC), "r.jsonl": _jsonl(MC)}),
    C("zoo-out-is-my-folder", "zoo build digits --out mine --banks-dir banks", "'mine' exists and is not a zoo",
      files={"mine/thesis.tex": "years of work"}),
    C("zoo-banks-dir-holds-my-folder", "zoo build digits --out zoo --banks-dir banks",
      "'banks/digits' exists and is not an item bank", files={"banks/digits/thesis.tex": "years of work"}),
    C("zoo-banks-dir-is-a-file", "zoo build digits --out zoo --banks-dir mine.txt", "'mine.txt' is a file",
      files={"mine.txt": "notes"}),
    C("zoo-unknown", "zoo build cifar", "unknown zoo 'cifar'"),
    C("calibrate-nan-base", "calibrate @bank --base @nan --models @a @b", "@nan has 1 NaN/Inf value(s)"),
    C("calibrate-unknown-device", "calibrate @bank --base @base --models @a @b --device tpu7", "'tpu7'"),
    C("calibrate-ns-text", "calibrate @bank --base @base --models @a --ns 5,abc", "--ns", "'5,abc'"),
    C("calibrate-dims-zero", "calibrate @bank --base @base --models @a --dims 0", "--dims", "'0'"),
    C("calibrate-negative-seed", "calibrate @bank --base @base --models @a --seed -1", "--seed"),
    C("calibrate-negative-merges", "calibrate @bank --base @base --models @a --random-merges -2", "--random-merges"),
    C("calibrate-10-to-the-12-merges", "calibrate @bank --base @base --models @a --random-merges 1000000000000",
      "--random-merges", "in 0..100000"),
    C("calibrate-names-count", "calibrate @bank --base @base --models @a @b --names x", "--names has 1 names for 2"),
    C("cli-unknown-command", "bogus", "invalid choice: 'bogus'"),
    C("cli-threads-zero", "--threads 0 leaderboard", "--threads"),
    C("cli-threads-env", "leaderboard nowhere", "MERGE3_THREADS", "'abc'", env={"MERGE3_THREADS": "abc"}),
]


@pytest.mark.parametrize("case", BANKS)
def test_banks_zoo_calibrate_and_cli(case, assets, runner, tmp_path):
    run_case(case, assets, runner, tmp_path)


def test_the_warm_runner_answers_as_a_new_process_does(assets, runner, tmp_path):
    """A few table cases again through real ``python -m merge3`` processes: same exit, same single line."""
    if COLD:
        pytest.skip("every case already runs in a new process")
    work = tmp_path / "work"
    work.mkdir()
    (work / "m.yaml").write_text(_subst(merge_yaml(model="@nan"), assets))
    (work / "s.yaml").write_text(_subst(space(objectives=["obj_import_raises:f"]), assets))
    (work / "q.jsonl").write_text(_jsonl(MC) + "{broken\n")
    env = {"PYTHONPATH": assets["mods"]}
    for args in (["merge", "m.yaml", "--out", "out"], ["search", "s.yaml", "--runs-dir", "runs"],
                 ["bank", "from-file", "q.jsonl", "--out", "new"], ["verify", assets["run"], "--top", "0"]):
        warm, new = runner(args, work, env), cold(args, work, env)
        assert (warm.returncode, warm.stderr) == (new.returncode, new.stderr)
        one_error(new, 2)
    assert sorted(p.name for p in work.iterdir()) == ["m.yaml", "q.jsonl", "s.yaml"]


@pytest.mark.slow
def test_rebuilding_the_digits_zoo_elsewhere_keeps_the_bank_calibration(tmp_path):
    """``zoo build digits --out OTHER`` rewrites item_banks/digits with identical items: its calibration stays."""
    first = cold(["zoo", "build", "digits", "--out", "zoo/digits"], tmp_path)
    assert first.returncode == 0, first.stderr
    calibration = tmp_path / "item_banks" / "digits" / "calibration"
    calibration.mkdir()
    (calibration / "estimator.json").write_text('{"fitted": "hours ago"}')
    before = snapshot(tmp_path / "item_banks")
    for _ in range(2):
        again = cold(["zoo", "build", "digits", "--out", "other"], tmp_path)
        assert again.returncode == 0, again.stderr
        assert snapshot(tmp_path / "item_banks") == before, "a rebuild with identical items keeps the bank as it is"
    assert "cached" in again.stdout, "the second build of OTHER is the cache"
    assert (calibration / "estimator.json").read_text() == '{"fitted": "hours ago"}'
    _no_temporaries(tmp_path)
