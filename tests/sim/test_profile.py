import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from autotune.errors import UserError
from autotune.sim.profile import (
    DEFAULT_PROFILE, MEASURED_SECTIONS, PROVENANCE_KINDS, load_profile, packaged_profiles,
)

PROFILES = Path(__file__).parents[2] / "autotune/sim/profiles"
PACKAGED = (PROFILES / "h100-80gb.toml").read_text()
MEASURED_FIELDS = [f"{name}.{f.name}" for name, cls in MEASURED_SECTIONS.items() for f in fields(cls)]

# A profile of one's own that carries the H100's measured numbers.
CARRIED = """
[profile]
carries = "h100-80gb"

[datasheet]
name = "my-gpu"
gpu = "My GPU"
gpus = 1
gpu_memory_gib = 40.0
memory_bandwidth_gb_s = 2000.0
peak_bf16_tflops = 300.0
sms = 100
interconnect = "PCIe 5.0 x16"
interconnect_bandwidth_gb_s = 63.0
"""


def test_the_four_packaged_profiles_load():
    assert packaged_profiles() == ["2x-rtx3090", "h100-80gb", "h200", "h200-datasheet"]
    names = ("h100-80gb", "2x-rtx3090", "h200", "h200-datasheet")
    h100, rtx, h200, sheet = (load_profile(n) for n in names)
    assert (h100.name, rtx.name, h200.name, sheet.name) == names
    assert (h100.gpus, rtx.gpus, h200.gpus, sheet.gpus) == (1, 2, 1, 1)
    assert (h100.status, rtx.status, h200.status, sheet.status) == ("measured", "modelled", "modelled", "modelled")
    assert (h100.carries, rtx.carries, h200.carries, sheet.carries) == (None, "h100-80gb", "h100-80gb", "h100-80gb")
    assert rtx.datasheet.gpu == "NVIDIA GeForce RTX 3090" and rtx.datasheet.gpu_memory_gib == 23.69
    for p in (h200, sheet):
        assert p.datasheet.gpu == "NVIDIA H200"
        assert p.datasheet.memory_bandwidth_gb_s == 4800.0 and p.datasheet.gpu_memory_gib == 139.8
    assert replace(h200.datasheet, name="x") == replace(sheet.datasheet, name="x")  # one GPU, two profiles


H200_FITTED = {"serving.frontend_delay_ms": 20.51, "serving.iteration_overhead_ms": 0.3994,
               "serving.seq_overhead_ms": 0.04698}
TRAINER_HOST = ("host_embed_ms", "host_layer_forward_ms", "host_head_loss_ms", "host_layer_backward_ms",
                "host_optimizer_ms")


def test_h200_datasheet_is_the_transfer_check_every_measured_number_from_the_h100():
    h100, sheet = load_profile("h100-80gb"), load_profile("h200-datasheet")
    for section in MEASURED_SECTIONS:
        assert getattr(sheet, section) == getattr(h100, section), section
    assert sheet.provenance_counts() == {"carried over": len(MEASURED_FIELDS)}
    assert sheet.field_provenance["serving.frontend_delay_ms"] == "fitted on h100-80gb"


def test_h200_fits_the_host_side_numbers_and_carries_the_rest():
    h100, h200 = load_profile("h100-80gb"), load_profile("h200")
    own = {**H200_FITTED, **{f"trainer.{f}": None for f in TRAINER_HOST}}
    assert {k for k, v in h200.field_provenance.items() if v == "fitted"} == set(own)
    assert h200.provenance_counts() == {"carried over": len(MEASURED_FIELDS) - len(own), "fitted": len(own)}
    for key, value in H200_FITTED.items():
        section, field = key.split(".")
        assert getattr(h200.serving, field) == value, key
    # the trainer's host times: the H100's, all scaled by one fitted factor (forward/backward split kept)
    # (fitted on the H100's earlier host times; the H100's refit scaled those by 0.82357)
    scales = [getattr(h200.trainer, f) / getattr(h100.trainer, f) for f in TRAINER_HOST]
    assert scales == pytest.approx([0.6616 / 0.82357] * len(scales), rel=2e-4)
    for key in MEASURED_FIELDS:  # everything else is the H100's
        if key not in own:
            section, field = key.split(".")
            assert getattr(getattr(h200, section), field) == getattr(getattr(h100, section), field), key


def test_the_default_is_the_papers_two_rtx_3090s():
    assert DEFAULT_PROFILE == "2x-rtx3090"
    p = load_profile()
    assert p.name == "2x-rtx3090" and p.gpus == 2 and p.source == "2x-rtx3090"


def test_h100_profile_has_a_provenance_for_every_measured_number():
    p = load_profile("h100-80gb")
    assert p.serving.max_num_batched_tokens == 8192
    assert sorted(p.field_provenance) == sorted(MEASURED_FIELDS)
    assert set(p.field_provenance.values()) <= set(PROVENANCE_KINDS)
    assert p.field_provenance["efficiency.memory_efficiency"] == "measured"
    assert p.field_provenance["serving.frontend_delay_ms"] == "fitted"
    assert sum(p.provenance_counts().values()) == len(MEASURED_FIELDS)
    assert "carried over" not in p.provenance_counts()


def test_derived_rates_are_datasheet_times_efficiency():
    rtx = load_profile("2x-rtx3090")
    eff = rtx.efficiency
    assert rtx.bandwidth_bytes_per_s == pytest.approx(936e9 * eff.memory_efficiency)
    assert rtx.flops_per_s == pytest.approx(71e12 * eff.matmul_efficiency)
    assert rtx.link_bytes_per_s == pytest.approx(31.5e9 * 0.35)


def test_rtx3090_carries_the_h100s_measured_numbers_and_overrides_a_few():
    h100, rtx = load_profile("h100-80gb"), load_profile("2x-rtx3090")
    assert rtx.trainer == h100.trainer and rtx.mps == h100.mps
    assert rtx.efficiency.memory_efficiency == h100.efficiency.memory_efficiency
    assert rtx.efficiency.matmul_efficiency == h100.efficiency.matmul_efficiency
    assert rtx.serving.frontend_delay_ms == h100.serving.frontend_delay_ms
    # its own: vLLM's defaults on a smaller GPU, and the link through the host
    assert rtx.serving.max_num_batched_tokens == 2048 != h100.serving.max_num_batched_tokens
    assert rtx.serving.max_num_seqs == 256
    assert rtx.efficiency.interconnect_efficiency == 0.35


def test_provenance_of_a_carried_field_says_where_it_came_from():
    rtx = load_profile("2x-rtx3090")
    assert sorted(rtx.field_provenance) == sorted(MEASURED_FIELDS)
    assert rtx.field_provenance["trainer.host_layer_backward_ms"] == "fitted on h100-80gb"
    assert rtx.field_provenance["efficiency.memory_efficiency"] == "measured on h100-80gb"
    assert rtx.field_provenance["mps.timeslice_loss"] == "modelled on h100-80gb"
    assert rtx.field_provenance["serving.max_num_batched_tokens"] == "spec"  # its own
    assert rtx.field_provenance["efficiency.interconnect_efficiency"] == "modelled"
    counts = rtx.provenance_counts()
    assert counts["carried over"] == len(MEASURED_FIELDS) - 5  # the file sets 5 fields of its own
    assert counts == {"carried over": len(MEASURED_FIELDS) - 5, "modelled": 3, "spec": 2}


def test_a_field_set_without_its_provenance_is_a_user_error(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(CARRIED + "\n[serving]\nmax_num_seqs = 128\n")
    with pytest.raises(UserError, match=r'\[provenance\] "serving.max_num_seqs" must be one of'):
        load_profile(f)
    f.write_text(CARRIED + '\n[serving]\nmax_num_seqs = 128\n[provenance]\n"serving.max_num_seqs" = "guessed"\n')
    with pytest.raises(UserError, match="got 'guessed'"):
        load_profile(f)
    f.write_text(CARRIED + '\n[serving]\nmax_num_seqs = 128\n[provenance]\n"serving.max_num_seqs" = "spec"\n')
    p = load_profile(f)
    assert p.serving.max_num_seqs == 128 and p.field_provenance["serving.max_num_seqs"] == "spec"
    assert p.field_provenance["serving.frontend_delay_ms"] == "fitted on h100-80gb"


def test_a_provenance_for_no_field_of_the_file_is_a_user_error(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(CARRIED + '\n[serving]\nmax_num_seqs = 128\n[provenance]\n"serving.max_num_seqs" = "spec"\n'
                 '"serving.max_seqs" = "spec"\n')
    with pytest.raises(UserError, match="names no field of this file: serving.max_seqs"):
        load_profile(f)


def test_carrying_an_unknown_profile_is_a_user_error(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(CARRIED.replace('carries = "h100-80gb"', 'carries = "a100-40gb"'))
    with pytest.raises(UserError, match="unknown hardware profile 'a100-40gb'"):
        load_profile(f)


def test_a_profile_that_carries_another_is_not_measured(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(CARRIED.replace('carries = "h100-80gb"', 'carries = "h100-80gb"\nstatus = "measured"'))
    with pytest.raises(UserError, match="is \"modelled\""):
        load_profile(f)


def test_profile_from_a_path(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(PACKAGED.replace('name = "h100-80gb"', 'name = "my-gpu"'))
    assert load_profile(f).name == "my-gpu"
    assert load_profile(str(f)).source == str(f)
    g = tmp_path / "carried.toml"
    g.write_text(CARRIED)
    p = load_profile(g)
    assert p.name == "my-gpu" and p.carries == "h100-80gb" and p.status == "modelled"
    assert p.trainer == load_profile("h100-80gb").trainer


def test_with_gpus_changes_the_count_only():
    h100 = load_profile("h100-80gb")
    four = h100.with_gpus(4)
    assert four.gpus == 4 and h100.gpus == 1
    assert four.datasheet.gpu_memory_gib == h100.datasheet.gpu_memory_gib
    assert (four.efficiency, four.serving, four.trainer, four.mps) == (h100.efficiency, h100.serving,
                                                                       h100.trainer, h100.mps)
    assert four.field_provenance == h100.field_provenance
    assert h100.with_gpus(1) is h100
    with pytest.raises(UserError, match="at least 1"):
        h100.with_gpus(0)


def test_describe_names_the_gpus_and_how_far_to_trust_them():
    rtx = load_profile("2x-rtx3090").describe()
    assert rtx.startswith("2x NVIDIA GeForce RTX 3090 (23.69 GiB, PCIe 4.0 x16): modelled")
    assert "carried over from h100-80gb" in rtx
    h100 = load_profile("h100-80gb")
    assert h100.describe().startswith("NVIDIA H100 80GB HBM3 (79.18 GiB, NVLink 4): measured")
    assert "carried" not in h100.describe()
    assert h100.with_gpus(4).describe().startswith("4x NVIDIA H100 80GB HBM3 ")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s + "\n[[broken", "not valid TOML"),
    (lambda s: s.replace("[trainer]", "[trainer_typo]"), "unknown section"),
    (lambda s: re.sub(r"^pause_check_ms = .*$", "", s, flags=re.M), "missing pause_check_ms"),
    (lambda s: re.sub(r"^sms = .*$", "", s, flags=re.M), r"\[datasheet\] is missing sms"),
    (lambda s: s.replace("[serving]", "[serving]\nwarp_speed = 3"), "unknown field"),
    (lambda s: re.sub(r"^iteration_overhead_ms = [0-9.]+", "iteration_overhead_ms = -1", s, flags=re.M), ">= 0"),
    (lambda s: re.sub(r"^memory_bandwidth_gb_s = [0-9.]+", "memory_bandwidth_gb_s = 0", s, flags=re.M), "> 0"),
    (lambda s: re.sub(r"^gpus = [0-9]+", "gpus = 0", s, flags=re.M), "gpus must be > 0"),
    (lambda s: re.sub(r"^memory_bound_loss = [0-9.]+", "memory_bound_loss = 1.0", s, flags=re.M), "below 1"),
    (lambda s: re.sub(r"^interconnect_efficiency = [0-9.]+", "interconnect_efficiency = 1.5", s, flags=re.M),
     "at most 1"),
    (lambda s: re.sub(r"^max_num_seqs = [0-9]+", "max_num_seqs = 2.5", s, flags=re.M), "integer"),
    (lambda s: re.sub(r"^matmul_efficiency = [0-9.]+", 'matmul_efficiency = "high"', s, flags=re.M), "number"),
    (lambda s: s.replace('status = "measured"', 'status = "calibrated"'), "status must be"),
])
def test_malformed_profile_is_a_user_error(tmp_path, edit, message):
    f = tmp_path / "bad.toml"
    f.write_text(edit(PACKAGED))
    with pytest.raises(UserError, match=message):
        load_profile(f)


def test_unknown_or_missing_profile_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown hardware profile 'a100-40gb'; choose one of: 2x-rtx3090, "
                                        "h100-80gb, h200, h200-datasheet"):
        load_profile("a100-40gb")
    with pytest.raises(UserError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
