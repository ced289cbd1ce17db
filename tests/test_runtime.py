"""Process-level settings: `runtime.threads` sets torch's CPU threads in the stages' processes."""

import json
import re

import pytest
import torch

from llm.runtime import set_threads
from tests.test_distributed import STAGE_ENV, run_stage, stage_project


def test_set_threads_sets_torchs_threads_and_zero_leaves_them():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(0) == 1  # 0: as it is
    finally:
        torch.set_num_threads(before)


def test_the_pretrain_stage_runs_on_runtime_threads(tmp_path):
    """`runtime.threads: 1` in params.yaml: the stage's process runs torch on one thread (its timings say so)."""
    project = stage_project(tmp_path)
    params = json.loads((project / "params.yaml").read_text())
    params["runtime"]["threads"] = 1
    (project / "params.yaml").write_text(json.dumps(params))
    out = run_stage(project, env={**STAGE_ENV, "OMP_NUM_THREADS": "2"})  # the param wins over torch's default
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((project / "timings" / "pretrain.json").read_text())["threads"] == 1


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "CPU", "cuda:0 "])
def test_a_device_name_params_yaml_refuses_is_refused_by_select_device_too(name):
    """One rule for device names (llm.choices.DEVICE_PATTERN): params.yaml, --device and the library."""
    from llm.errors import LLMError
    from llm.pipeline.params import parse_params
    from llm.runtime import select_device

    with pytest.raises(LLMError, match=re.escape(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")):
        select_device(name)
    with pytest.raises(LLMError, match="train.device"):
        parse_params({"train": {"device": name}})
