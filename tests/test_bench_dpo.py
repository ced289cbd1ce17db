"""bench/bench_dpo.py compares like with like: its two sides (the notebook's loop, the stage's code) track
the same losses and rewards from the same weights and pairs, and a difference stops it before any time
is reported."""

import copy
import json

import pytest
import torch
from torch.utils.data import Subset

from bench import bench_dpo
from llm.dpo import PreferenceDataset
from llm.model import GPTModel
from llm.tokenizer import get_tokenizer
from tests.test_finetune_dpo import cfg, preferences


def test_both_sides_track_the_same_numbers_and_a_difference_stops_the_bench(tmp_path):
    pairs = PreferenceDataset(json.loads((tmp_path / preferences(tmp_path, 20)).read_text()), get_tokenizer())
    train, val = Subset(pairs, range(16)), Subset(pairs, range(16, 20))
    torch.manual_seed(0)
    config = cfg()
    state = GPTModel(config).state_dict()
    settings = {"batch_size": 4, "beta": 0.1, "lr": 1e-3, "weight_decay": 0.01, "eval_freq": 2, "eval_iter": 2,
                "max_length": 64}  # fmt: skip
    _, book = bench_dpo.run_book(config, copy.deepcopy(state), train, val, settings, seed=1)
    seconds, stage = bench_dpo.run_stage(config, copy.deepcopy(state), train, val, settings, seed=1)
    assert seconds > 0 and len(book["train_losses"]) == 2 and book["train_losses"][-1] != book["train_losses"][0]
    assert bench_dpo.assert_equal(book, stage) < 1e-4
    other = {**stage, "val_losses": [x + 1e-3 for x in stage["val_losses"]]}
    with pytest.raises(SystemExit, match="differ from the book's by 1.00e-03"):
        bench_dpo.assert_equal(book, other)
