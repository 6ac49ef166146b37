"""Searches on the real digits zoo: API, CLI, determinism, kill -9 and resume, executors, bad configs."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

import merge3
from merge3 import Merge3Error
from merge3.runs import Run

from _runs import ENV, strip, wait_for_lines
from _runs import cli as _cli



def space_dict(zoo, **over):
    space = {
        "name": "e2e",
        "seed": 0,
        "models": {"base": str(zoo.base), "endpoints": [str(p) for p in zoo.finetuned.values()]},
        "bank": {"path": str(zoo.bank), "estimator": "full", "items_per_task": None},
        "genome": {"granularity": "layer", "methods": ["task_arithmetic", "ties", "tsv_merge"]},
        "engine": {"population": 6, "generations": 3},
        "executor": {"kind": "local"},
    }
    for key, value in over.items():
        space[key] = {**space[key], **value} if isinstance(value, dict) else value
    return space




def test_api_search_is_reproducible_and_accounts_its_cost(digits_zoo, tmp_path):
    a = merge3.search(space_dict(digits_zoo), runs_dir=tmp_path, name="a", progress=False)
    b = merge3.search(space_dict(digits_zoo), runs_dir=tmp_path, name="b", progress=False)
    assert strip(a.run.records()) == strip(b.run.records())
    # generation 0 is all 12 recipes (3 methods × 4 scales, more than a population of 6), then 2 × 6
    assert len(a.result.records) == 24
    meta = a.run.meta
    from merge3.itembank import ItemBank

    search_items = len(ItemBank.load(digits_zoo.bank).search_indices)
    assert search_items == 4495 - 5 * 300, "a third of the held-out images is the test split"
    assert meta["status"] == "finished" and meta["items_evaluated"] == 24 * search_items == meta["full_bank_equivalent"]
    best = a.best
    assert set(best.scores) == set(digits_zoo.finetuned) and best.objectives[0] == pytest.approx(best.mean)
    # the recorded score is what the merge really gets: rebuild it with the pure functions and evaluate
    from merge3.itembank import make_evaluator
    from merge3.methods import layer_groups, merge_groups, plans_from_choices
    from merge3.models import load_model, load_state_dict

    base = load_state_dict(digits_zoo.base)
    fts = [load_state_dict(p) for p in digits_zoo.finetuned.values()]
    groups = layer_groups(base)
    merged = merge_groups(base, fts, plans_from_choices(groups, best.plan))
    model = load_model(digits_zoo.base)
    model.load_state_dict(merged)
    bank = ItemBank.load(digits_zoo.bank)
    rows = bank.search_indices
    truth = bank.per_task_accuracy(make_evaluator(bank)(model, rows), rows)
    assert truth == pytest.approx(best.scores, abs=1e-9)


def test_custom_objectives_through_the_api_and_by_import_path(digits_zoo, tmp_path, objective_module):
    def worst_task(result):
        return min(result.scores.values())

    out = merge3.search(space_dict(digits_zoo, engine={"generations": 1}), objectives=[worst_task, "mean"],
                        runs_dir=tmp_path, name="custom", progress=False)
    rec = out.result.records[0]
    assert rec.objectives == pytest.approx([min(rec.scores.values()), rec.mean])
    assert out.run.config["objectives"] == ["<api:worst_task>", "mean"]
    with pytest.raises(Merge3Error, match="passed through the API"):
        merge3.resume(out.run.path)
    path_space = space_dict(digits_zoo, engine={"generations": 1}, objectives=["my_objectives:best_task"])
    by_path = merge3.search(path_space, runs_dir=tmp_path, name="by-path", progress=False)
    rec = by_path.result.records[0]
    assert rec.objectives == pytest.approx([max(rec.scores.values())])


@pytest.mark.parametrize(
    "over, message",
    [
        ({"genome": {"methods": ["task_arithmetic", "slerpy"]}}, "unknown merge method 'slerpy'"),
        ({"genome": {"weights": {"low": 2.0, "high": 1.0}}}, "bounds reversed"),
        ({"bank": {"path": "/nonexistent/bank"}}, "field 'bank.path': '/nonexistent/bank' does not exist"),
        ({"objectives": ["no_such_pkg.mod:fn"]}, "cannot import 'no_such_pkg.mod:fn'"),
        ({"genome": {"params": {"ties.density": {"low": 0.5, "high": 1.5}}}}, "ties.density"),
    ],
)
def test_bad_configs_fail_before_any_work(digits_zoo, tmp_path, over, message):
    with pytest.raises(Merge3Error, match=message):
        merge3.search(space_dict(digits_zoo, **over), runs_dir=tmp_path, name="bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_cli_bad_config_is_one_error_line(digits_zoo, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space_dict(digits_zoo, engine={"population": 0})))
    out = subprocess.run([sys.executable, "-m", "merge3", "search", str(path), "--runs-dir", str(tmp_path)],
                         capture_output=True, text=True, env=ENV)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: {path}: field 'engine.population': Input should be greater than or equal to 2"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(digits_zoo, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space_dict(digits_zoo, engine={"population": 6, "generations": 4})))
    whole = _cli("search", path, "--runs-dir", tmp_path, "--name", "whole", "--quiet")
    assert whole.returncode == 0, whole.stderr
    proc = _cli("search", path, "--runs-dir", tmp_path, "--name", "killed", "--quiet", wait=False)
    log = tmp_path / "killed" / "evaluations.jsonl"
    wait_for_lines(log, 8, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = log.read_text().count("\n")
    assert 8 <= done_before < 30, "the kill should land mid-run"
    resumed = _cli("resume", tmp_path / "killed", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    killed, reference = Run.open(tmp_path / "killed").records(), Run.open(tmp_path / "whole").records()
    assert strip(killed) == strip(reference)
    assert len({(r.generation, r.index) for r in killed}) == len(killed) == 12 + 3 * 6  # all 12 recipes first
    assert "resuming with" in (tmp_path / "killed" / "log.txt").read_text()
    with pytest.raises(Merge3Error, match="already finished"):
        merge3.resume(tmp_path / "killed")


def test_demo_space_with_cheap_fitness_end_to_end(calibrated_zoo, tmp_path):
    from merge3._api import verify
    from merge3.search import load_space

    zoo = calibrated_zoo
    shipped = load_space("search_spaces/demo.yaml")
    space = shipped.model_dump(mode="json")
    space["models"] = {"base": str(zoo.base), "endpoints": [str(p) for p in zoo.finetuned.values()],
                       "names": list(zoo.finetuned)}
    space["bank"]["path"] = str(zoo.bank)
    space["engine"].update(population=6, generations=3)
    space["executor"] = {"kind": "local"}
    outcome = merge3.search(space, runs_dir=tmp_path, name="demo", progress=False)
    records = outcome.run.records()
    first = [r for r in records if r.rung == 0]
    promoted = [r for r in records if r.rung == 1]
    assert all(r.items_evaluated == 100 for r in first), "20 fresh items per task × 5 tasks"
    assert len(promoted) == 2 * 3 and all(r.items_evaluated == 300 for r in promoted), "top 2 answer 3× more"
    assert all(len(r.answers["soft"]) == r.items_evaluated for r in records), "the demo ranks with soft scores"
    assert outcome.best.rung == 1, "only a promoted candidate may be the run's best"
    meta = outcome.run.meta
    # records() holds each candidate's latest record, whose items are cumulative: a promoted one answered 100 + 200
    assert meta["items_evaluated"] == 100 * len(first) + 300 * len(promoted)
    assert meta["cost_ratio"] == pytest.approx(len(records) * 2995 / meta["items_evaluated"])
    verified = verify(outcome.run.path, top=2, log=lambda *a: None)
    assert len(verified) == 2 and all(v["items"] == {"search": 2995, "test": 1500} for v in verified)
    # the estimate is an estimate of the search-split accuracy: close, not equal (cv-irt on 3-10 % of the split)
    assert all(abs(v["estimated_mean"] - v["search_mean"]) < 0.1 for v in verified)
    assert (outcome.run.path / "verified.json").exists()


def test_calibration_cache_is_keyed_by_model_contents_not_paths(calibrated_zoo):
    from merge3.search import CalibrationSettings, calibrate_bank

    settings = CalibrationSettings(random_merges=40, ns=[20], dims=5, subset_methods=["random", "anchor-irt"])
    messages = []
    calibrate_bank(calibrated_zoo.bank, os.path.relpath(calibrated_zoo.base),
                   [os.path.relpath(p) for p in calibrated_zoo.finetuned.values()], settings,
                   names=list(calibrated_zoo.finetuned), log=messages.append)
    assert len(messages) == 1 and "cached" in messages[0]


def test_uncalibrated_subset_size_is_a_clear_error(calibrated_zoo, tmp_path):
    with pytest.raises(Merge3Error, match="no random subset with n=7 per task"):
        merge3.search(space_dict(calibrated_zoo, bank={"estimator": "gp-irt", "items_per_task": 7}),
                      runs_dir=tmp_path, name="x", progress=False)


def test_same_task_space_aligns_with_c2m3_and_beats_naive_averaging(digits_zoo, tmp_path):
    from merge3._api import verify
    from merge3.search import load_space

    space = load_space("search_spaces/digits_same_task.yaml").model_dump(mode="json")
    space["models"] = {"endpoints": [str(p) for p in digits_zoo.same_task]}
    space["bank"]["path"] = str(digits_zoo.same_task_bank)
    space["engine"].update(population=4, generations=2)
    outcome = merge3.search(space, runs_dir=tmp_path, name="same", progress=False)
    assert all(g["method"] == "c2m3" for g in outcome.best.plan)
    test = verify(outcome.run.path, top=1, log=lambda *a: None)[0]["test_mean"]
    naive = digits_zoo.info["accuracy"]["same_task"]["naive average"]
    assert test > naive + 0.2 and test > 0.9


def test_export_round_trip_scores_what_the_run_verified(digits_zoo, tmp_path):
    from merge3._api import export, verify
    from merge3.itembank import ItemBank, make_evaluator
    from merge3.models import load_model

    outcome = merge3.search(space_dict(digits_zoo, engine={"generations": 1}), runs_dir=tmp_path, name="ex",
                            progress=False)
    verified = verify(outcome.run.path, top=2, log=lambda *a: None)
    folder = export(outcome.run.path, tmp_path / "best", rank=1)
    bank = ItemBank.load(digits_zoo.bank)
    rows = bank.test_indices
    score = bank.per_task_accuracy(make_evaluator(bank)(load_model(folder), rows), rows)
    assert score == pytest.approx(max(verified, key=lambda v: v["test_mean"])["test"], abs=1e-9), "ranked by test"
    manifest = json.loads((folder / "merge3-manifest.json").read_text())
    assert manifest["test_scores"] == pytest.approx(score) and len(manifest["inputs"]) == 6
    assert "test split" in (folder / "README.md").read_text()
    with pytest.raises(Merge3Error, match="already exists"):
        export(outcome.run.path, tmp_path / "best")
    with pytest.raises(Merge3Error, match="out of range"):
        export(outcome.run.path, tmp_path / "other", rank=10_000)


# --- what a user sees after a search: leaderboard, report, export with mergekit.yaml ---------------------------------
@pytest.fixture(scope="module")
def two_runs(digits_zoo, tmp_path_factory):
    """A single-objective run (two candidates verified) and a multi-objective (per-task, NSGA-II) run."""
    from merge3._api import verify

    runs = tmp_path_factory.mktemp("runs")
    single = merge3.search(space_dict(digits_zoo, engine={"generations": 2}), runs_dir=runs, name="single",
                           progress=False)
    verify(single.run.path, top=2, log=lambda *a: None)
    multi = merge3.search(space_dict(digits_zoo, objectives=["per_task"], engine={"algorithm": "nsga2", "generations": 2}),
                          runs_dir=runs, name="multi", progress=False)
    return runs, single, multi


def test_leaderboard_ranks_merges_of_both_runs_beside_the_baselines(two_runs):
    runs, single, multi = two_runs
    frame = merge3.leaderboard(runs)
    merges, baselines = frame[frame["kind"] == "merge"], frame[frame["kind"] == "baseline"]
    assert set(merges["run"]) == {"single", "multi"}
    assert (merges["run"] == "multi").sum() == len({json.dumps(r.genome, sort_keys=True) for r in multi.result.pareto()})
    assert {"base", "endpoint ft-upright", "endpoint ft-permuted"} <= set(baselines["candidate"])
    assert {"task_arithmetic", "ties", "dare", "tsv_merge"} <= set(baselines["methods"])
    for _, tier in frame.groupby("score_on", sort=False):
        assert list(tier["score"]) == sorted(tier["score"], reverse=True), "best first"
    verified = merges[merges["verified"]]
    assert len(verified) == 2 and verified["error"].notna().all() and verified["gap"].notna().all()
    assert (verified["score"] == verified["test_mean"]).all(), "a verified merge is ranked by its test score"
    # filters
    assert merge3.leaderboard(runs, verified_only=True, baselines=False)["verified"].all()
    top = merge3.leaderboard(runs, top=1)
    assert (top["kind"] == "merge").sum() == 1 and (top["kind"] == "baseline").sum() == len(baselines)
    by_task = merge3.leaderboard(runs, task="rot90", baselines=False)
    for _, tier in by_task.groupby("score_on", sort=False):
        assert list(tier["score"]) == sorted(tier["score"], reverse=True)
    with pytest.raises(Merge3Error, match="--task 'nope' is not a task"):
        merge3.leaderboard(runs, task="nope")


@pytest.mark.parametrize("fmt", ["csv", "markdown", "json", "html"])
def test_every_leaderboard_format_parses(two_runs, tmp_path, fmt):
    import io
    from html.parser import HTMLParser

    import pandas as pd

    from merge3.cli import main

    runs = two_runs[0]
    frame = merge3.leaderboard(runs)
    out = tmp_path / f"board.{fmt}"
    out.write_text("an older board")
    assert main(["leaderboard", str(runs), "--format", fmt, "--out", str(out), "--force"]) == 0, \
        "--force replaces an existing file (without it: one error, tested in test_hostile_inputs)"
    text = out.read_text()
    if fmt == "csv":
        parsed = pd.read_csv(io.StringIO(text))
        assert len(parsed) == len(frame) and parsed["score"].tolist() == pytest.approx(frame["score"].tolist())
    elif fmt == "json":
        parsed = json.loads(text)
        assert len(parsed) == len(frame) and parsed[0]["score"] == pytest.approx(frame["score"][0])
    elif fmt == "markdown":
        lines = text.strip().splitlines()
        assert len(lines) == len(frame) + 2 and all(line.startswith("|") and line.endswith("|") for line in lines)
        cells = {line.count(" | ") for n, line in enumerate(lines) if n != 1}
        assert len(cells) == 1, "every row has as many cells as the header"
    else:
        class Rows(HTMLParser):
            rows = 0

            def handle_starttag(self, tag, attrs):
                self.rows += tag == "tr"

        parser = Rows()
        parser.feed(text)
        assert parser.rows == len(frame) + 1


def _images(page: str) -> list[bytes]:
    import base64
    import re

    sources = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), "self-contained: every image inlined"
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def test_report_is_self_contained_and_every_image_loads(two_runs):
    import matplotlib.image

    _, single, multi = two_runs
    for run, expected in ((single.run, {"convergence", "genome", "estimator_error", "cost"}),
                          (multi.run, {"convergence", "pareto", "genome", "cost"})):
        page = (run.path / "report.html").read_text()
        images = _images(page)
        assert len(images) == len(expected)
        for png in images:
            assert png.startswith(b"\x89PNG") and matplotlib.image.imread(io_bytes(png)).shape[0] > 100
        assert {p.stem for p in (run.path / "report").glob("*.png")} == expected


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_export_writes_mergekit_yaml_that_rebuilds_the_merge(digits_zoo, tmp_path):
    from merge3._api import export
    from merge3.methods import merge_from_config
    from merge3.models import load_state_dict

    space = space_dict(digits_zoo, genome={"methods": ["ties"]}, engine={"generations": 1})
    outcome = merge3.search(space, runs_dir=tmp_path, name="ties", progress=False)
    folder = export(outcome.run.path, tmp_path / "best")
    manifest = json.loads((folder / "merge3-manifest.json").read_text())
    assert manifest["mergekit_yaml"] == "mergekit.yaml"
    rebuilt = load_state_dict(merge_from_config(folder / "mergekit.yaml", tmp_path / "rebuilt"))
    exported = load_state_dict(folder)
    assert all(torch_allclose(rebuilt[k], v) for k, v in exported.items())
    tsv = merge3.search(space_dict(digits_zoo, genome={"methods": ["tsv_merge"]}, engine={"generations": 1}),
                        runs_dir=tmp_path, name="tsv", progress=False)
    folder = export(tsv.run.path, tmp_path / "tsv-best")
    assert not (folder / "mergekit.yaml").exists()
    assert "tsv_merge has no mergekit equivalent" in json.loads((folder / "merge3-manifest.json").read_text())["mergekit_yaml"]


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a.float(), b.float(), atol=1e-6))


@pytest.mark.slow
def test_merge3_demo_command_end_to_end_at_a_tiny_budget(digits_zoo, tmp_path, capsys):
    """`merge3 demo` on a copy of the zoo: calibrate, search on Ray, verify, leaderboard, report, export."""
    import shutil

    from merge3.cli import main

    root = digits_zoo.path.parent.parent
    shutil.copytree(root / "zoo", tmp_path / "zoo")
    shutil.copytree(root / "item_banks", tmp_path / "item_banks", ignore=shutil.ignore_patterns("calibration", "baselines"))
    space = yaml.safe_load(open("search_spaces/demo.yaml"))
    space["engine"].update(population=6, generations=2)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    code = main(["demo", "--space", str(tmp_path / "tiny.yaml"), "--zoo-dir", str(tmp_path / "zoo" / "digits"),
                 "--banks-dir", str(tmp_path / "item_banks"), "--runs-dir", str(tmp_path / "runs"),
                 "--random-merges", "24", "--top", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "report.html").exists() and (run / "verified.json").exists()
    assert (run / "best-merge" / "merge3-manifest.json").exists()
    assert "leaderboard" in out and "TSV-M λ=" in out and str(run / "report.html") in out.replace("\n", "")
    assert "zoo: cached" in out or "cached" in out, "the copied zoo is reused, not rebuilt"
    flat = " ".join(out.split())
    assert "(test split, items the search never saw)" in flat and "ahead on the test split" in flat


def test_row_block_space_searches_builds_and_exports_what_it_scored(digits_zoo, tmp_path):
    """The shipped row-block space (CMA-ES over per-block TSV weights): recorded scores are what the merge gets when
    rebuilt by the pure functions, and the export explains why it has no mergekit.yaml."""
    from merge3._api import export
    from merge3.itembank import ItemBank, make_evaluator
    from merge3.methods import layer_groups, merge_groups, plans_from_choices
    from merge3.models import load_model, load_state_dict
    from merge3.search import load_space

    space = load_space("search_spaces/demo.yaml").model_dump(mode="json")
    space["models"] = {"base": str(digits_zoo.base), "endpoints": [str(p) for p in digits_zoo.finetuned.values()]}
    space["bank"] = {"path": str(digits_zoo.bank), "estimator": "full", "items_per_task": None}
    space["engine"].update(population=6, generations=2)
    space["executor"] = {"kind": "local"}
    outcome = merge3.search(space, runs_dir=tmp_path, name="rows", progress=False)
    best = outcome.best
    assert all(set(w) == {"row_blocks"} and len(w["row_blocks"]) == 16 for g in best.plan for w in g["params"]["weights"])
    base = load_state_dict(digits_zoo.base)
    fts = [load_state_dict(p) for p in digits_zoo.finetuned.values()]
    merged = merge_groups(base, fts, plans_from_choices(layer_groups(base), best.plan))
    model = load_model(digits_zoo.base)
    model.load_state_dict(merged)
    bank = ItemBank.load(digits_zoo.bank)
    rows = bank.search_indices
    assert bank.per_task_accuracy(make_evaluator(bank)(model, rows), rows) == pytest.approx(best.scores, abs=1e-9)
    folder = export(outcome.run.path, tmp_path / "best", rank=1)
    assert not (folder / "mergekit.yaml").exists()
    assert "row-block" in json.dumps(json.loads((folder / "merge3-manifest.json").read_text()))
