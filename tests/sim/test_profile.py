import re
from pathlib import Path

import pytest

from autotune.errors import UserError
from autotune.sim.profile import load_profile, packaged_profiles

PACKAGED = (Path(__file__).parents[2] / "autotune/sim/profiles/h100-80gb.toml").read_text()


def test_packaged_profile_loads_with_provenance():
    p = load_profile()
    assert p.hardware.name == "h100-80gb"
    assert p.serving.max_num_batched_tokens == 8192
    assert p.measurements > 0
    assert p.status.startswith("modelled from roofline + ") and p.status.endswith("not calibrated")
    assert "h100-80gb" in packaged_profiles()


def test_profile_from_a_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(PACKAGED.replace('name = "h100-80gb"', 'name = "my-gpu"'))
    assert load_profile(f).hardware.name == "my-gpu"
    assert load_profile(str(f)).source == str(f)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s + "\n[[broken", "not valid TOML"),
    (lambda s: s.replace("[trainer]", "[trainer_typo]"), "unknown section"),
    (lambda s: re.sub(r"^pause_check_ms = .*$", "", s, flags=re.M), "missing pause_check_ms"),
    (lambda s: s.replace("[serving]", "[serving]\nwarp_speed = 3"), "unknown field"),
    (lambda s: re.sub(r"^iteration_overhead_ms = [0-9.]+", "iteration_overhead_ms = -1", s, flags=re.M), ">= 0"),
    (lambda s: re.sub(r"^hbm_bandwidth_gb_s = [0-9.]+", "hbm_bandwidth_gb_s = 0", s, flags=re.M), "> 0"),
    (lambda s: re.sub(r"^memory_bound_loss = [0-9.]+", "memory_bound_loss = 1.0", s, flags=re.M), "below 1"),
    (lambda s: re.sub(r"^max_num_seqs = [0-9]+", "max_num_seqs = 2.5", s, flags=re.M), "integer"),
    (lambda s: re.sub(r"^matmul_efficiency = [0-9.]+", 'matmul_efficiency = "high"', s, flags=re.M), "number"),
])
def test_malformed_profile_is_a_user_error(tmp_path, edit, message):
    f = tmp_path / "bad.toml"
    f.write_text(edit(PACKAGED))
    with pytest.raises(UserError, match=message):
        load_profile(f)


def test_unknown_or_missing_profile_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown simulator profile"):
        load_profile("a100-40gb")
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
