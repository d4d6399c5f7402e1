"""``autotune calibrate``: a simulator profile for the GPU at hand.

Measures, through the real backend, what the host side of a profile needs
(serving alone at a few rates: the API server's delay and the engine's
per-iteration and per-request costs; a prefill probe of long prompts one at a
time: what a prefill costs beyond its GEMMs) and how the trainer splits its time
between the host and the GPU (the trainer alone with every thread, then
capped by MPS at a few active-thread percentages: a launch-bound trainer
barely slows until its GPU time, stretched by the cap, outgrows its host
time; where that happens says how much of a step is GPU work). It fits those
numbers with ``autotune.sim.fit`` on a base profile that gives the datasheet
and everything else (efficiencies, the MPS contention model), and writes a
TOML profile that says where every number came from and on what GPU, driver,
CUDA, PyTorch and vLLM it was measured.

Last, a few co-located trials (the artifact's vLLM + torchtune at fig8a's
workload, the busiest measured rate, the trainer capped at each MPS
percentage) fit the MPS contention terms: how much serving and a capped
trainer slow each other.

What it does not measure yet (the base profile's numbers stand, marked as
carried over): the GEMM and bandwidth roofline, the MPS share law of a single
GEMM, the slowdown without MPS, and the cost of a pause.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone

from autotune.context import StudyConfig, study_workload
from autotune.errors import UserError
from autotune.figures import get_figure
from autotune.models import ModelConfig, resolve_model
from autotune.sim.backend import SimBackend
from autotune.sim.fit import Fit, Param, Target, fit, loss_of, residuals
from autotune.sim.profile import MEASURED_SECTIONS, Profile, is_carried
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialResult, TrialSpec
from autotune.workloads.arrivals import poisson_arrivals
from autotune.workloads.build import WorkloadOptions, build_workload
from autotune.workloads.spec import RequestSpec, Workload

#: The numbers a calibration fits, each in a physical range.
FIT_PARAMS = (
    Param("frontend delay", ("serving.frontend_delay_ms",), 2.0, 40.0),
    Param("iteration overhead", ("serving.iteration_overhead_ms",), 0.2, 4.0),
    # What a prefill costs on top of its GEMMs (attention, norms, the mixed batch's kernels): from
    # the prefill probe (long prompts of one length, one at a time), whose TTFT is mostly the prefill.
    Param("prefill compute overhead", ("serving.nongemm_compute_fraction",), 0.0, 2.0),
    Param("per-request overhead", ("serving.seq_overhead_ms",), 0.0, 0.15),
    Param("trainer host time scale", ("trainer.host_embed_ms", "trainer.host_layer_forward_ms",
                                      "trainer.host_head_loss_ms", "trainer.host_layer_backward_ms",
                                      "trainer.host_optimizer_ms"), 0.2, 1.5, scale=True),
    Param("trainer GPU time factor", ("trainer.gpu_eager_factor",), 0.5, 4.0),
    # The MPS contention model (autotune.sim.contention), from co-located trials only:
    Param("memory-bound loss", ("mps.memory_bound_loss",), 0.05, 0.9),
    Param("memory-bound loss exponent", ("mps.memory_bound_loss_exponent",), 0.5, 3.0),
    Param("compute-bound loss", ("mps.compute_bound_loss",), 0.05, 0.8),
    Param("trainer host slowdown", ("mps.trainer_host_slowdown",), 0.0, 0.5),
)
#: What a co-located measurement fits: both P99s the SLO is judged on, and the trainer's throughput.
COLOCATED_METRICS = ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s")
#: P99 TTFT is recorded (its residual shows in the profile) but not fitted: the simulator misses it
#: already with no trainer beside the server (on the H100 studies: 52.6 ms against 63-171 ms serving
#: alone; the API server's tail, see benchmarks/results/fidelity/README.md), and contention terms
#: fitted to it would take up that serving-side miss.
COLOCATED_WEIGHTS = (0.0, 2.0, 2.0)
#: The server the measurements run: the artifact's vLLM + torchtune (MPS on, 0.45 of the memory).
CALIBRATION_SYSTEM = "vllm-torchtune"
DEFAULT_RATES_REQ_S = (4.0, 24.0)
DEFAULT_TRIAL_SECONDS = 20.0
DEFAULT_MPS_THREAD_PCTS = (10, 40)  # the trainer alone, capped: its GPU time shows
#: The co-located trials' trainer caps (MPS active-thread %): what serving does to a capped trainer
#: and a capped trainer to serving (the H100 studies that fitted the contention terms ran 75-100%).
DEFAULT_COLOCATED_THREAD_PCTS = (10, 40)
#: The prefill probe: prompts of one length (tokens), few output tokens, far apart, so that each
#: TTFT is the API server's delay, a wait for the iteration in flight and one prefill. Its P50 is
#: smooth in the prefill's cost, where the P99 TTFT of a ShareGPT-like run (set by a few long
#: prompts colliding) jumps as batches regroup. 0: no probe.
DEFAULT_PREFILL_PROMPT_TOKENS = 1536
PREFILL_PROBE_OUTPUT_TOKENS = 8
PREFILL_PROBE_RATE_REQ_S = 1.0
PREFILL_PROBE_REQUESTS = 20
#: A serving-alone run is a prefill probe when every prompt has at least this many tokens.
PREFILL_PROBE_MIN_TOKENS = 512


def parse_thread_pcts(text: str, flag: str = "--mps-thread-pcts", uncapped: bool = False) -> tuple[int, ...]:
    """``--mps-thread-pcts`` (or ``flag``): whole percentages in 1..99 (1..100 if ``uncapped``),
    comma-separated, or none."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            pct = int(part)
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not a whole percentage") from None
        top = 100 if uncapped else 99
        if not 1 <= pct <= top:
            raise UserError(f"{flag}: {pct} is not in 1..{top}" + ("" if uncapped else " (100 is the uncapped run, always made)"))
        out.append(pct)
    return tuple(out)


@dataclass(frozen=True)
class Measurement:
    name: str  # "serving alone, fig8a 24 req/s"
    spec: TrialSpec
    metrics: tuple[str, ...]  # what of its result is fitted
    weights: tuple[float, ...]
    trial: Mapping[str, object] | None = None  # a co-located trial: what ``colocated_measurement`` took


def check_prefill_prompt_tokens(tokens: int, max_model_len: int) -> int:
    """``--prefill-prompt-tokens``: 0 (no probe), or a prompt long enough to be a probe that fits
    the server's context with the probe's output."""
    longest = max_model_len - PREFILL_PROBE_OUTPUT_TOKENS
    if tokens != 0 and not PREFILL_PROBE_MIN_TOKENS <= tokens <= longest:
        raise UserError(f"--prefill-prompt-tokens must be 0 (no probe) or {PREFILL_PROBE_MIN_TOKENS}..{longest} "
                        f"(the server's {max_model_len}-token context less {PREFILL_PROBE_OUTPUT_TOKENS} output "
                        f"tokens), got {tokens}")
    return tokens


def prefill_probe_workload(prompt_tokens: int, seed: int = 0) -> Workload:
    """``PREFILL_PROBE_REQUESTS`` prompts of ``prompt_tokens``, Poisson at ``PREFILL_PROBE_RATE_REQ_S``."""
    arrivals = poisson_arrivals(PREFILL_PROBE_REQUESTS, PREFILL_PROBE_RATE_REQ_S, seed)
    requests = tuple(RequestSpec(float(t), prompt_tokens, PREFILL_PROBE_OUTPUT_TOKENS) for t in arrivals)
    return Workload(requests, PREFILL_PROBE_RATE_REQ_S, seed, synthetic=True,
                    description=f"prefill probe: {prompt_tokens}-token prompts, {PREFILL_PROBE_OUTPUT_TOKENS} "
                                f"output tokens, Poisson at {PREFILL_PROBE_RATE_REQ_S:g} req/s")


def measurement_specs(model: ModelConfig, rates_req_s: Sequence[float] = DEFAULT_RATES_REQ_S,
                      trial_seconds: float = DEFAULT_TRIAL_SECONDS,
                      mps_thread_pcts: Sequence[int] = DEFAULT_MPS_THREAD_PCTS,
                      seed: int = 0, prefill_prompt_tokens: int = 0,
                      colocated_thread_pcts: Sequence[int] = ()) -> list[Measurement]:
    """Serving alone on fig8a's workload (Poisson, ShareGPT-like lengths) at
    each rate, then the prefill probe (if ``prefill_prompt_tokens``), then the
    trainer alone on full samples: with every thread, and under MPS at each
    active-thread percentage; last, co-located trials at the busiest rate with
    the trainer at each of ``colocated_thread_pcts``."""
    system = get_system(CALIBRATION_SYSTEM)
    policy = system.policy(system.default_params())
    out = []
    for rate in rates_req_s:
        workload = build_workload(WorkloadOptions(arrivals="poisson", rate_req_s=rate,
                                                  num_prompts=max(1, math.ceil(rate * trial_seconds)), seed=seed))
        name = f"serving alone, fig8a {rate:g} req/s"
        spec = TrialSpec(TrialKind.SERVING_ALONE, system.name, {}, policy, model, workload, seed,
                         label=f"calibrate-serving-{rate:g}rps")
        out.append(Measurement(name, spec, ("ttft_p50_ms", "tpot_p50_ms"), (1.0, 2.0)))
    if prefill_prompt_tokens:
        spec = TrialSpec(TrialKind.SERVING_ALONE, system.name, {}, policy, model,
                         prefill_probe_workload(prefill_prompt_tokens, seed), seed,
                         label=f"calibrate-prefill-{prefill_prompt_tokens}")
        out.append(Measurement(f"serving alone, {prefill_prompt_tokens}-token prompts", spec, ("ttft_p50_ms",), (2.0,)))
    for pct in (100, *mps_thread_pcts):
        trainer = replace(policy.trainer_alone(), trainer_mps_active_thread_pct=pct)
        capped = f" at {pct}% MPS threads" if pct < 100 else ""
        spec = TrialSpec(TrialKind.TRAINER_ALONE, system.name, {}, trainer, model, None, seed,
                         label=f"calibrate-trainer-alone-{pct}pct")
        out.append(Measurement("trainer alone" + capped, spec, ("peft_samples_per_s",), (2.0,)))
    busiest = max(rates_req_s)  # the serving-alone run's workload there: its P99s are the trainer's doing
    for pct in colocated_thread_pcts:
        trial = {"system": system.name, "figure": "fig8a", "rate_req_s": busiest,
                 "params": {"mps_active_thread_pct": pct}, "num_prompts": max(1, math.ceil(busiest * trial_seconds)),
                 "trial_seconds": None, "seed": seed}
        out.append(colocated_measurement(model, trial, f"co-located, fig8a {busiest:g} req/s, trainer at {pct}% MPS threads"))
    return out


def colocated_measurement(model: ModelConfig, trial: Mapping[str, object], name: str) -> Measurement:
    """A co-located trial measured elsewhere (a study's trial on the GPU): ``trial`` gives its system,
    knobs (``params``), figure, rate, ``num_prompts`` (None: the figure's), ``trial_seconds`` (None:
    the whole workload), workload ``seed`` and, if not ``model``, its ``model``; the spec is the one a
    study of those would run. Its P99 TTFT, P99 TPOT and PEFT samples/s fit the contention terms."""
    if "model" in trial:  # a trial of another model than the calibration's
        model = resolve_model(str(trial["model"]))
    system = get_system(str(trial["system"]))
    figure = get_figure(str(trial["figure"]))
    rate = float(trial["rate_req_s"])  # type: ignore[arg-type]
    params = {k: float(v) for k, v in dict(trial["params"]).items()}  # type: ignore[call-overload]
    params = {k.name: int(params[k.name]) if k.type == "int" else params[k.name] for k in system.knobs}
    seconds = trial.get("trial_seconds")
    prompts = trial.get("num_prompts")
    seed = int(trial.get("seed", 0))  # type: ignore[call-overload]
    config = StudyConfig(system=system.name, figure=figure.name, rate_req_s=rate, model=model.name, seed=seed,
                         num_prompts=None if prompts is None else int(prompts),  # type: ignore[call-overload]
                         trial_seconds=None if seconds is None else float(seconds))  # type: ignore[arg-type]
    workload = study_workload(config, figure, system, rate)
    knobs = "-".join(f"{k}{v:g}" for k, v in sorted(params.items()))  # its own run folder and prompts
    spec = TrialSpec(TrialKind.COLOCATED, system.name, params, system.policy(params), model, workload, seed,
                     number=0, label=f"calibrate-colocated-{system.name}-{figure.name}-{rate:g}rps-{knobs}")
    return Measurement(name, spec, COLOCATED_METRICS, COLOCATED_WEIGHTS, dict(trial))


@dataclass(frozen=True)
class Measured:
    measurement: Measurement
    values: Mapping[str, float]  # the measurement's metrics, as the GPU gave them
    error: str | None = None  # why the run crashed (then values is empty)


def targets_of(measured: Sequence[Measured]) -> list[Target]:
    """The fit's targets: every measured number of every run that did not crash."""
    out = []
    for got in measured:
        m = got.measurement
        if got.error is not None:
            continue
        out += [Target(m.name, m.spec, k, got.values[k], w) for k, w in zip(m.metrics, m.weights) if got.values.get(k)]
    return out


#: Each measured number fits the part of the model it reflects, in this order: the engine's
#: per-iteration costs from P50 TPOT, then the API server's delay and (with a prefill probe) a
#: prefill's cost from P50 TTFT (over the engine's queueing just fitted; with a probe both serving
#: stages run twice, the prefill's cost moving P50 TPOT a little), then the trainer's host and GPU time, each from
#: runs of its own; last, over all of those, the contention terms from co-located trials. A joint
#: fit lets TTFT's growth with load, which the simulator's constant API-server delay cannot follow,
#: bend the engine's costs (seen on the H200: P50 TPOT off by +-10% at both rates).
FIT_STAGES = (
    (TrialKind.SERVING_ALONE, ("tpot_p50_ms",), ("iteration overhead", "per-request overhead")),
    (TrialKind.SERVING_ALONE, ("ttft_p50_ms",), ("frontend delay", "prefill compute overhead")),
    (TrialKind.TRAINER_ALONE, ("peft_samples_per_s",), ("trainer host time scale", "trainer GPU time factor")),
    (TrialKind.COLOCATED, COLOCATED_METRICS, ("memory-bound loss", "memory-bound loss exponent",
                                              "compute-bound loss", "trainer host slowdown")),
)


def _serving_rates(targets: Sequence[Target]) -> set[float]:
    """The rates of the serving-alone runs on ShareGPT-like prompts (a prefill probe's is no rate of those)."""
    return {t.spec.workload.rate_req_s for t in targets
            if t.spec.kind is TrialKind.SERVING_ALONE and t.spec.workload is not None and not _is_probe(t)}


def _is_probe(target: Target) -> bool:
    """A serving-alone run whose every prompt is long: its TTFT is mostly the prefill."""
    w = target.spec.workload
    return (target.spec.kind is TrialKind.SERVING_ALONE and w is not None and bool(w.requests)
            and min(r.prompt_len for r in w.requests) >= PREFILL_PROBE_MIN_TOKENS)


def _prefill_probe(targets: Sequence[Target]) -> bool:
    return any(_is_probe(t) for t in targets)


def _capped(targets: Sequence[Target], kind: TrialKind) -> bool:
    return any(t.spec.kind is kind and t.spec.policy.mps and t.spec.policy.trainer_mps_active_thread_pct < 100
               for t in targets)


#: What a number needs among the targets to be resolved; without it the base profile's stands
#: (one serving rate cannot split an iteration's cost into a fixed and a per-request part; ShareGPT-like
#: prompts, mostly short, leave the prefill's cost to the P99, too jagged to fit: only the prefill probe
#: shows it; only a trainer capped by MPS shows its GPU time, or the loss beside a trainer of less than
#: the whole GPU).
RESOLVED_BY = {
    "per-request overhead": lambda ts: len(_serving_rates(ts)) >= 2,
    "prefill compute overhead": _prefill_probe,
    "trainer GPU time factor": lambda ts: _capped(ts, TrialKind.TRAINER_ALONE),
    "memory-bound loss exponent": lambda ts: _capped(ts, TrialKind.COLOCATED),
}


def fit_measured(base: Profile, targets: Sequence[Target], sweeps: int = 5) -> Fit:
    """The numbers of ``FIT_PARAMS`` in ``base`` fitted to ``targets`` on the
    simulator, stage by stage (``FIT_STAGES``); stages with no target are skipped,
    and so are the numbers the targets do not resolve (``RESOLVED_BY``)."""
    params = {p.name: p for p in FIT_PARAMS}
    profile, values, fields = base, {}, {}
    stages = FIT_STAGES
    if _prefill_probe(targets):  # the prefill's cost moves the P50 TPOT a little: both serving stages again
        stages = FIT_STAGES[:2] * 2 + FIT_STAGES[2:]
    for kind, metrics, names in stages:
        stage_targets = [t for t in targets if t.spec.kind is kind and t.metric in metrics]
        resolved = [params[n] for n in names if RESOLVED_BY.get(n, lambda ts: True)(targets)]
        if not stage_targets or not resolved:
            continue
        stage = fit(profile, stage_targets, resolved, _run, sweeps=sweeps)
        profile = stage.profile
        values.update(stage.values)
        fields.update(stage.fields)
    res = residuals(profile, targets, _run)
    return Fit(profile, values, fields, loss_of(targets, res), res, tuple(t.name for t in targets))


def _run(profile: Profile, spec: TrialSpec) -> TrialResult:
    return SimBackend(profile).run_trial(spec)


def gpu_driver() -> str:
    """The NVIDIA driver's version, or "unknown"."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def profile_toml(name: str, base: Profile, result: Fit, machine: Mapping[str, object],
                 measured: Sequence[Measured], command: str) -> str:
    """A profile file: the base's datasheet (with the GPU count), its own
    measured numbers, the fitted ones, and the rest carried over."""
    carries = base.carries or base.name
    d = replace(base.datasheet, name=name, gpus=int(machine.get("gpus", base.gpus)))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Simulator profile written by `{command}` on {when}.",
        "# Measured on: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "# Fitted to (measured -> simulated with the fitted numbers):",
    ]
    for t in targets_of(measured):
        rel = result.residuals.get(f"{t.name}: {t.metric}")
        lines.append(f"#   {t.name}: {t.metric} {t.value:.4g}" + (f" ({rel:+.1%})" if rel is not None else ""))
    for got in measured:
        if got.error is not None:
            lines.append(f"#   {got.measurement.name}: crashed ({got.error}); not used")
    lines += [
        "# Datasheet numbers are the base profile's; unmeasured numbers are carried over from it.",
        "",
        "[profile]",
        f'provenance = "{d.gpu}: {_fitted_parts(result)} fitted by autotune calibrate; the rest from {base.name}"',
        'status = "modelled"',
        f'carries = "{carries}"',
        "",
        "[datasheet]",
    ]
    for f in fields(d):
        lines.append(f"{f.name} = {_toml_value(getattr(d, f.name))}")
    own = {k: _field(base, k) for k, how in base.field_provenance.items() if not is_carried(how)}
    values = {**own, **result.fields}
    provenance = {**{k: base.field_provenance[k] for k in own}, **{k: "fitted" for k in result.fields}}
    for section in MEASURED_SECTIONS:
        keys = [k for k in values if k.startswith(section + ".")]
        if keys:
            lines += ["", f"[{section}]"] + [f"{k.split('.', 1)[1]} = {_toml_value(values[k])}" for k in keys]
    lines += ["", "[provenance]"] + [f'"{k}" = "{how}"' for k, how in provenance.items()]
    return "\n".join(lines) + "\n"


def _fitted_parts(result: Fit) -> str:
    """What a fit set, in words: "host-side numbers, the prefill's cost and the trainer GPU time"."""
    parts = ["host-side numbers"]
    if "serving.nongemm_compute_fraction" in result.fields:
        parts.append("the prefill's cost")
    parts.append("the trainer GPU time")
    if any(k.startswith("mps.") for k in result.fields):
        parts.append("the MPS contention terms")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _field(profile: Profile, key: str) -> float:
    section, name = key.split(".")
    return getattr(getattr(profile, section), name)


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return f"{v:.6g}" if "e" not in f"{v:.6g}" else repr(v)
    return str(v)


Progress = Callable[[str], None]


def measure(run_trial: Callable[[TrialSpec], TrialResult], measurements: Sequence[Measurement],
            progress: Progress = print) -> list[Measured]:
    """Run every measurement; a crashed one is kept with its reason."""
    out = []
    for i, m in enumerate(measurements, 1):
        progress(f"[{i}/{len(measurements)}] {m.name} ...")
        result = run_trial(m.spec)
        metrics = result.metrics()
        values = {k: metrics[k] for k in m.metrics if k in metrics} if not result.crashed else {}
        got = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        progress(f"[{i}/{len(measurements)}] {m.name}: " + (f"crashed: {result.error}" if result.crashed else got))
        out.append(Measured(m, values, result.error if result.crashed else None))
    return out


@dataclass(frozen=True)
class Plan:
    """What a calibration measures: enough to rebuild its trial specs."""
    model: str  # preset name or folder
    rates_req_s: tuple[float, ...]
    trial_seconds: float
    mps_thread_pcts: tuple[int, ...]
    prefill_prompt_tokens: int = 0  # the prefill probe's prompt length; 0: none (calibrations before it)
    colocated_thread_pcts: tuple[int, ...] = ()  # the co-located trials' trainer caps (none before them)

    def specs(self, model: ModelConfig) -> list[Measurement]:
        return measurement_specs(model, self.rates_req_s, self.trial_seconds, self.mps_thread_pcts,
                                 prefill_prompt_tokens=self.prefill_prompt_tokens,
                                 colocated_thread_pcts=self.colocated_thread_pcts)


def measurements_json(plan: Plan, machine: Mapping[str, object], base: str, measured: Sequence[Measured]) -> str:
    """The raw measurements of a calibration, for ``--refit`` without the GPU."""
    return json.dumps({
        "version": 1, "machine": dict(machine), "base": base, "plan": asdict(plan),
        "measured": [{"name": m.measurement.name, "values": dict(m.values), "error": m.error,
                      **({"trial": dict(m.measurement.trial)} if m.measurement.trial is not None else {})}
                     for m in measured],
    }, indent=1) + "\n"


def load_measurements(text: str, where: str) -> tuple[Plan, dict[str, object], str, list[Measured]]:
    """(plan, machine, base profile, measured) from ``measurements_json``'s text; UserError if malformed."""
    try:
        data = json.loads(text)
        p = data["plan"]
        plan = Plan(str(p["model"]), tuple(float(r) for r in p["rates_req_s"]), float(p["trial_seconds"]),
                    tuple(int(x) for x in p["mps_thread_pcts"]), int(p.get("prefill_prompt_tokens", 0)),
                    tuple(int(x) for x in p.get("colocated_thread_pcts", ())))
        model = resolve_model(plan.model)
        by_name = {m.name: m for m in plan.specs(model)}
        measured = [Measured(colocated_measurement(model, d["trial"], d["name"]) if "trial" in d
                             else by_name[d["name"]], {k: float(v) for k, v in d["values"].items()}, d.get("error"))
                    for d in data["measured"]]
        return plan, dict(data["machine"]), str(data["base"]), measured
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: not a calibration's measurements file ({type(e).__name__}: {e})") from None
