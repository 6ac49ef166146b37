"""The pipeline's shape, checked on the source: models → methods → itembank → runtime → search → runs →
(federated) → cli.

A stage imports only stages to its left, and only through their public ``__init__`` (never another package's
``_private`` module); bench scripts use public names only. Imports inside functions count too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["models", "methods", "itembank", "runtime", "search", "runs"]
# zoo builds models and banks (it sits after itembank); federated is application layer like the top-level modules
# (_api, cli): it may use every stage (a round's server search is an ordinary merge3 search)
ALLOWED = {stage: set(STAGES[:i]) for i, stage in enumerate(STAGES)} | {"zoo": {"models", "methods", "itembank"},
                                                                         "federated": {*STAGES, "zoo"}}


def _imports(file: Path):
    """(line, dotted module) of every absolute import in ``file``; ``from merge3 import x`` counts as ``merge3.x``."""
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "merge3":
                yield from ((node.lineno, f"merge3.{a.name}") for a in node.names)
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def _violations(file: Path, own: str | None):
    for line, name in _imports(file):
        parts = name.split(".")
        if parts[0] != "merge3" or len(parts) < 2:
            continue
        package = parts[1]
        where = f"{file.relative_to(ROOT)}:{line} imports {name}"
        if own is None:  # bench/: public names only
            if any(p.startswith("_") for p in parts[1:]):
                yield f"{where} (bench scripts use public names)"
            continue
        if package == own or package.startswith("_"):
            continue  # its own package; merge3._errors (the one error type) is below every stage
        if len(parts) > 2 and parts[2].startswith("_"):
            yield f"{where} (another package's private module: import it from merge3.{package})"
        if own in ALLOWED and package not in ALLOWED[own]:
            yield f"{where} ({own} may import only {', '.join(sorted(ALLOWED[own])) or 'nothing of merge3'})"


def test_stages_import_only_stages_to_their_left_through_their_public_init():
    found = []
    for file in sorted((ROOT / "merge3").rglob("*.py")):
        rel = file.relative_to(ROOT / "merge3").parts
        own = rel[0] if len(rel) > 1 else "_top"
        if own == "_top":
            continue  # _api, cli, __main__: the application layer uses every stage
        found += _violations(file, own)
    assert not found, "\n".join(found)


def test_bench_scripts_use_public_names_only():
    found = [v for file in sorted((ROOT / "bench").glob("*.py")) for v in _violations(file, None)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from merge3.methods._params import layer_index\n", "another package's private module"),
    ("def f():\n    from merge3.runs import Run\n", "may import only"),
])
def test_the_check_finds_what_it_forbids(tmp_path, source, expected):
    (tmp_path / "merge3" / "runtime").mkdir(parents=True)
    file = tmp_path / "merge3" / "runtime" / "x.py"
    file.write_text(source)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = list(_violations(file, "runtime"))
    finally:
        ROOT = saved
    assert len(found) == 1 and expected in found[0]


def _name_tests(file: Path, names: set[str]):
    """Comparisons of something called a method with a method's name: ``method == "ties"``, ``"c2m3" in methods``,
    ``c["method"].startswith("dare")`` (an option such as ``combine == "ties"`` is not a method)."""
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        strings, subject = [], ""
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            strings = [n.value for n in operands if isinstance(n, ast.Constant)]
            subject = " ".join(ast.unparse(n) for n in operands if not isinstance(n, ast.Constant))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith":
            strings = [a.value for a in node.args if isinstance(a, ast.Constant)]
            subject = ast.unparse(node.func.value)
        if "method" not in subject:
            continue
        for value in strings:
            if isinstance(value, str) and any(value == n or (len(value) > 3 and n.startswith(value)) for n in names):
                yield f"{file.relative_to(ROOT)}:{node.lineno} tests a method's name ({value!r})"


def test_no_module_tests_a_merge_methods_name_outside_its_own_declaration():
    """What a method needs elsewhere (precompute, genes, recipes, mergekit form, same-task alignment) is declared
    with it, so builder, genome, baselines, export and CLI never branch on its name."""
    import inspect

    from merge3.methods import registered

    methods = {name: Path(inspect.getfile(m.fn)).resolve() for name, m in registered().items()}
    found = []
    for file in sorted((ROOT / "merge3").rglob("*.py")):
        others = {name for name, home in methods.items() if home != file.resolve()}
        found += list(_name_tests(file, others))
    assert not found, "\n".join(found)
    probe = ROOT / "tests" / "_probe_name_test.py"
    try:
        probe.write_text('def f(method, methods, p):\n    return (method == "ties" or "c2m3" in methods or '
                         'p["method"].startswith("dare") or p["combine"] == "ties")\n')
        assert len(list(_name_tests(probe, {"ties", "c2m3", "dare"}))) == 3  # the check finds what it forbids
    finally:
        probe.unlink()
