"""The GPU backend: what can be checked on the CPU, and one real study on a GPU."""

from __future__ import annotations

import json

import pytest

from autotune.gpu.backend import _trainer_failure, hardware_profile


@pytest.mark.parametrize("name, mib, profile", [
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80gb"),
    ("NVIDIA H200", 143771, "h200-140gb"),
    ("NVIDIA A10G", 23028, "a10g-22gb"),
    ("NVIDIA GeForce RTX 3090", 24576, "rtx-3090-24gb"),
])
def test_hardware_profile_names(name, mib, profile):
    assert hardware_profile(name, mib) == profile


def test_trainer_failure_reasons(tmp_path):
    (tmp_path / "trainer-status.json").write_text(json.dumps({"state": "oom", "message": "trainer out of memory: 2 GiB"}))
    assert _trainer_failure(3, tmp_path) == "trainer out of memory: 2 GiB"
    (tmp_path / "trainer-status.json").write_text(json.dumps({"state": "error", "message": "ValueError: x"}))
    reason = _trainer_failure(1, tmp_path)
    assert reason.startswith("trainer exited with code 1: ValueError: x") and "trainer.log" in reason


@pytest.mark.gpu
def test_one_real_study_on_the_gpu(tmp_path):
    pytest.importorskip("vllm")
    from autotune.backends import make_backend
    from autotune.study import StudyConfig, run_study

    config = StudyConfig(system="llmstation", figure="fig8a", backend="gpu", rate_req_s=4.0, model="llama-3.2-1b",
                         sampler="random", trial_seconds=10.0, runs_dir=tmp_path)
    with make_backend("gpu", runs_dir=tmp_path) as backend:
        ctx = run_study(config, backend, n_trials=2)
    for t in ctx.study.trials:
        assert set(t.constraints) == {"ttft_p99", "tpot_p99"}
        assert t.user_attrs["outcome"] in ("feasible", "infeasible"), t.user_attrs.get("error")
        assert t.user_attrs["metrics"]["peft_samples_per_s"] > 0
        assert t.user_attrs["metrics"]["completed"] > 0
