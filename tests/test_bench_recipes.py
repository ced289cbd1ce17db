"""bench/bench_recipes.py measures what it says: a recipe's time to target is read off its curve between the
evaluations around the target, every recipe is valid params (a `dvc exp run -S` line), the seeds' spread
decides "beyond the spread", and a recipe trains with the pipeline's loop on the given windows."""

import json

import numpy as np
import pytest

from bench import bench_recipes as br
from bench import sweep_recipes as sweep
from llm.data import TokenWindowDataset
from llm.pipeline.profiles import parse_set
from llm.pipeline.validate import read_yaml
from tests.conftest import ROOT


def curve(*points):
    return [{"seconds": s, "tokens": t, "val_loss": v} for s, t, v in points]


def test_time_to_target_is_interpolated_between_the_evaluations_around_it():
    c = curve((0, 0, 10.0), (10, 1000, 6.0), (20, 2000, 4.0))
    assert br.reach(c, 5.0) == pytest.approx((15.0, 1500.0))
    assert br.reach(c, 6.0) == (10, 1000)  # met at an evaluation
    assert br.reach(c, 3.9) is None  # never reached
    assert br.reach(curve((5, 100, 3.0)), 4.0) == (5, 100)  # below the target at the first evaluation


@pytest.mark.parametrize("name", list(br.RECIPES))
def test_every_recipe_is_valid_params_and_a_dvc_set_line(name):
    params = br.recipe_params(br.RECIPES[name])
    for text in br.sets_text(br.RECIPES[name]).split(" -S ")[1:] if br.RECIPES[name] else []:
        path, value = parse_set(text.removeprefix("-S "))
        section = getattr(params, path[0])
        assert getattr(section, path[1]) == value, text


def test_the_book_recipe_is_params_yaml_as_committed():
    assert br.RECIPES["book"] == {}
    t = br.recipe_params({}).train
    assert (t.lr, t.batch_size, t.lr_schedule, t.precision, t.optimizer) == (4e-4, 2, "constant", "fp32", "adamw")


def run(name, seconds, finals):
    return {"name": name, "sets": br.RECIPES.get(name, {}), "load": (0.0, 0.0), "tokens_per_sec": 1.0,
            "curve": curve((0, 0, 11.0), (seconds, seconds * 10, finals))}  # fmt: skip


def test_beyond_the_spread_needs_every_seed_faster_than_every_seed_of_the_book():
    runs = [run("book", s, 5.0) for s in (100, 110, 120)]
    runs += [run("fast", s, 4.0) for s in (40, 45, 50)]  # all faster than the book's fastest
    runs += [run("cosine", s, 4.5) for s in (90, 105, 130)]  # overlaps the book's seeds
    rows, record = br.summarize(runs, 5.0, 1.0)
    by = {row[0]: row for row in rows}
    assert by["fast"][5] == "yes" and by["cosine"][5] == "no" and by["book"][5] == "—"
    assert record["fast"]["speedup"] == pytest.approx(110 / br.reach(runs[4]["curve"], 5.0)[0])


def test_a_seed_that_misses_the_target_is_said():
    runs = [run("book", 100, 5.0), run("book", 100, 5.0), run("muon", 50, 4.0), run("muon", 50, 6.0)]
    rows, _ = br.summarize(runs, 5.0, 1.0)
    muon = next(row for row in rows if row[0] == "muon")
    assert "1 of 2 missed" in muon[2] and muon[5] == "no: a seed missed the target"


def test_a_recipe_trains_on_the_windows_until_its_budget_or_max_steps():
    ids = np.random.default_rng(0).integers(0, 50257, 4000).astype(np.uint16)
    train, val = TokenWindowDataset(ids[:3000], 256, 256), TokenWindowDataset(ids[3000:], 256, 256)
    sets = {"model.emb_dim": 32, "model.n_heads": 2, "model.n_layers": 1, "train.max_steps": 3, "train.batch_size": 2}
    out = br.train_recipe("tiny", sets, train, val, budget=1e9, eval_tokens=512)
    steps = [p["step"] for p in out["curve"]]
    assert steps == [0, 1, 2, 3] and out["curve"][-1]["tokens"] == 3 * 2 * 256
    assert all(p["seconds"] >= 0 for p in out["curve"]) and out["curve"][-1]["val_loss"] < 11.5


def test_the_shakespeare_profile_trains_with_the_fast_recipe():
    """docs/recipes.md: the Shakespeare profile is the benchmark's fast recipe on tinyshakespeare."""
    profile = read_yaml(ROOT / "profiles" / "shakespeare.yaml")
    flat = {f"{section}.{key}": value for section, values in profile.items() for key, value in values.items()}
    assert {key: flat.get(key) for key in br.RECIPES["fast"]} == br.RECIPES["fast"]
    assert flat["data.corpus"] == ["tinyshakespeare"]


def test_the_fast_recipe_is_the_sweeps_chosen_candidate():
    """bench/sweep_recipes.py is how `fast` was chosen: its candidates are valid params and `fast` is one of them."""
    for sets in sweep.CANDIDATES.values():
        br.recipe_params(sets)
    assert sweep.CANDIDATES["b4-muon-6e-3"] == br.RECIPES["fast"]


def test_the_sweep_report_is_rebuilt_from_its_records_and_a_rerun_replaces_the_earlier_one(tmp_path):
    def record(name, final):
        points = curve((0, 0, 11.0), (30, 50_000, 6.0), (60, 100_000, final))
        return {"name": name, "sets": sweep.CANDIDATES[name], "curve": points, "load": (2.0, 2.0),
                "tokens_per_sec": 1500.0, "date": "2026-12-07"}  # fmt: skip

    jsonl = tmp_path / "sweep.jsonl"
    lines = [record("b4-muon-6e-3", 5.9), record("b2-adamw-1e-3", 5.8), record("b4-muon-6e-3", 5.0)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = sweep.main(["--report-only", "--jsonl", str(jsonl), "--target", "5.5"])
    rows = [line for line in text.splitlines() if line.startswith("| b")]
    assert [row.split(" | ")[0] for row in rows] == ["| b2-adamw-1e-3", "| b4-muon-6e-3"]  # the sweep's order
    assert rows[0].split(" | ")[1] == "not reached"
    assert rows[1].split(" | ")[1] == "75,000" and "-S train.lr=0.006" in rows[1]  # the rerun's curve
    assert (tmp_path / "sweep.md").read_text() == text
