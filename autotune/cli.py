"""The ``autotune`` command: one sub-command per system, plus ``workload``.

    autotune llmstation --figure fig8a --trials 40
    autotune workload fig9a --rate 4 --out requests.jsonl

Thin commands: parse, build a config, call library code. Bad input is one
line on stderr and exit code 2; a failing environment (a folder that cannot be
written, a full disk, a storage that does not answer) one line and exit code
1. What can be checked before the first trial is.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import optuna
import typer
from typer.core import TyperGroup
from rich.console import Console

from autotune.backends import make_backend
from autotune.calibrate import (
    DEFAULT_COLOCATED_THREAD_PCTS,
    DEFAULT_PREFILL_PROMPT_TOKENS,
    Plan,
    check_prefill_prompt_tokens,
    fit_measured,
    gpu_driver,
    load_measurements,
    measure,
    measurements_json,
    parse_thread_pcts,
    profile_toml,
    targets_of,
)
from autotune.errors import EnvironmentFailure, UserError, os_error, raise_interrupted
from autotune.figure import (FigureRequest, check_figure, parse_choices, parse_ints, parse_rates, parse_systems,
                             run_figure)
from autotune.figures import FIGURES, LORA_DISTS, LORA_RANKS, get_figure
from autotune.gpu.backend import gpu_count
from autotune.gpu.server import ServerConfig
from autotune.live import LiveReporter, PlainReporter, trial_table
from autotune.models import resolve_model
from autotune.results import (StudyResult, check_json_path, format_params, load_result, summary_text, tradeoff_curve,
                              write_json)
from autotune.samplers import DEFAULT_SAMPLER, SAMPLERS
from autotune.sim.profile import DEFAULT_PROFILE, load_profile, packaged_profiles
from autotune.slo import SloSpec
from autotune.study import StudyConfig, check_runs_dir, check_seed, run_study, storage_url
from autotune.systems import SYSTEMS, get_system
from autotune.workers import run_workers, visible_devices
from autotune.workloads.build import WorkloadOptions, build_workload


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """Typer vendors click in newer releases and uses click itself in older ones."""
    classes = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


class _Interrupted(Exception):
    """Ctrl-C (or SIGTERM) on its way past Typer, which would turn a
    KeyboardInterrupt into a bare exit code and drop what it says."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class _Group(TyperGroup):
    """Every user error is one line on stderr and exit code 2, every failure of
    the environment one line and exit code 1, Ctrl-C one line and exit code
    130; no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(str(e), getattr(e, "signum", signal.SIGINT)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with _sigterm_as_interrupt():  # the same clean end as Ctrl-C, exit 143
            self._main(args, prog_name, complete_var, **extra)

    def _main(self, args, prog_name, complete_var, **extra):
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            if code == 130:  # a Ctrl-C that Typer caught itself
                raise _Interrupted()
        except EnvironmentFailure as e:  # before UserError, its base class
            err.print(f"autotune: error: {e}", markup=False)
            sys.exit(1)
        except UserError as e:
            err.print(f"autotune: error: {e}", markup=False)
            sys.exit(2)
        except _click_exceptions("NoArgsIsHelpError") as e:
            print(e.ctx.get_help())
            sys.exit(0)
        except _click_exceptions("UsageError") as e:
            err.print(f"autotune: error: {_usage_message(e)}", markup=False)
            sys.exit(2)
        except (_Interrupted, KeyboardInterrupt, *_click_exceptions("Abort")) as e:
            why = str(e) if isinstance(e, (_Interrupted, KeyboardInterrupt)) and str(e) else \
                "the study keeps every finished trial"
            err.print(f"autotune: interrupted; {why}", markup=False)
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))
        sys.exit(0)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises ``Interrupted`` (main thread, where nobody else handles it)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def _usage_message(e) -> str:
    msg = " ".join(e.format_message().split()).replace("Value error, ", "")
    if "No such command" in msg:
        msg += f" Choose one of: {', '.join([*SYSTEMS, 'figure', 'workload', 'show', 'list', 'calibrate'])}."
    return msg


app = typer.Typer(
    name="autotune",
    cls=_Group,
    help="SLO-aware autotuner for GPU sharing between LLM serving and LoRA fine-tuning.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Figure = enum.Enum("Figure", {name: name for name in FIGURES}, type=str)
Sampler = enum.Enum("Sampler", {name: name for name in SAMPLERS}, type=str)
LoraDist = enum.Enum("LoraDist", {name: name for name in LORA_DISTS}, type=str)
BackendName = enum.Enum("BackendName", {"sim": "sim", "gpu": "gpu"}, type=str)
Objective = enum.Enum("Objective", {"peft": "peft", "pareto": "pareto"}, type=str)
_OBJECTIVE_HELP = ("peft: max PEFT samples/s under the SLO; pareto: also min P99 TTFT and P99 TPOT "
                   "(multi-objective; the SLO still marks feasibility)")


def _tune(system: str):
    def command(
        figure: Annotated[Figure, typer.Option(help="figure preset (workload, rate, prompts)")] = Figure["fig8a"],
        trials: Annotated[int, typer.Option(min=1, help="trials to add to the study")] = 40,
        rate: Annotated[Optional[float], typer.Option(help="request rate, req/s (default: the figure's, per hardware)")] = None,
        num_prompts: Annotated[Optional[int], typer.Option(help="requests per trial (default: the figure's)")] = None,
        backend: Annotated[BackendName, typer.Option(help="sim: embedded simulator; gpu: real trials")] = BackendName["sim"],
        sampler: Annotated[Sampler, typer.Option(help="Optuna sampler")] = Sampler[DEFAULT_SAMPLER],
        objective: Annotated[Objective, typer.Option(help=_OBJECTIVE_HELP)] = Objective["peft"],
        seed: Annotated[int, typer.Option(help="seed of the workload, sampler and simulator noise")] = 0,
        slo_ttft_ms: Annotated[Optional[float], typer.Option(help="absolute P99 TTFT limit, ms")] = None,
        slo_tpot_ms: Annotated[Optional[float], typer.Option(help="absolute P99 TPOT limit, ms")] = None,
        slo_ttft_ratio: Annotated[Optional[float], typer.Option(help="P99 TTFT limit as a multiple of serving alone "
                                                                "(default: the paper's 500 ms)")] = None,
        slo_tpot_ratio: Annotated[Optional[float], typer.Option(help="P99 TPOT limit as a multiple of serving alone "
                                                                "(default: the paper's 50 ms for 8B, 80 ms larger)")] = None,
        storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default: SQLite under --runs-dir)")] = None,
        study_name: Annotated[Optional[str], typer.Option(help="default: system-figure-rate-backend")] = None,
        search_space: Annotated[Optional[Path], typer.Option(help="TOML file of knob ranges")] = None,
        model: Annotated[Optional[str], typer.Option(help="model preset or local folder (default: the figure's)")] = None,
        sharegpt: Annotated[Optional[Path], typer.Option(help="ShareGPT_V3_unfiltered_cleaned_split.json")] = None,
        burstgpt: Annotated[Optional[Path], typer.Option(help="BurstGPT_without_fails_2.csv")] = None,
        tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.json (or its folder) for exact token counts")] = None,
        lora_dist: Annotated[Optional[LoraDist], typer.Option(help="fig13: adapters per request")] = None,
        lora_rank: Annotated[int, typer.Option(help="fig13: rank of the served adapters (8, 16, 32)")] = 8,
        json_path: Annotated[Optional[Path], typer.Option("--json", help="write the results here")] = None,
        runs_dir: Annotated[Path, typer.Option(help="study database, reference cache, logs")] = Path("autotune-runs"),
        hardware: Annotated[Optional[str], typer.Option(help=f"sim: packaged hardware profile (default {DEFAULT_PROFILE}; "
                                                        "`autotune list` shows them)")] = None,
        profile: Annotated[Optional[Path], typer.Option(help="sim: a hardware profile TOML file of your own")] = None,
        noise: Annotated[float, typer.Option(help="sim: relative measurement noise (std)")] = 0.0,
        trial_seconds: Annotated[Optional[float], typer.Option(help="shorten each trial's traffic window, s")] = None,
        warmup_s: Annotated[float, typer.Option("--warmup-s", help="trainer warm-up excluded from PEFT throughput, s")] = 0.0,
        no_mps: Annotated[bool, typer.Option("--no-mps", help="gpu: run without the MPS daemon (recorded)")] = False,
        vllm_arg: Annotated[Optional[list[str]], typer.Option(help="gpu: extra vLLM server flag (repeatable)")] = None,
        finetune_data: Annotated[Optional[Path], typer.Option(help="gpu: Alpaca-format JSON for the trainer")] = None,
        gpus: Annotated[Optional[int], typer.Option(help="GPUs: tensor parallel serving, one FSDP trainer rank each "
                                                    "(sim default: the profile's; gpu default: 1)")] = None,
        gpu_mem_gb: Annotated[Optional[float], typer.Option(help="gpu: hold each GPU to this many GiB (artifact: 24)")] = None,
        confirm: Annotated[int, typer.Option(min=0, help="re-run the best settings on N fresh workloads; "
                                             "recommend the best that meets the SLO on all")] = 0,
        plain: Annotated[bool, typer.Option(help="one line per trial instead of the live table")] = False,
        workers: Annotated[int, typer.Option(help="worker processes of the study, --trials among them (gpu: "
                                             "--gpus GPUs each, its own server port and MPS folder)")] = 1,
    ) -> None:
        if lora_rank not in LORA_RANKS:
            raise UserError(f"--lora-rank must be one of {', '.join(map(str, LORA_RANKS))}, got {lora_rank}")
        config = StudyConfig(
            system=system, figure=figure.value, backend=backend.value, rate_req_s=rate,
            num_prompts=num_prompts, model=model,
            slo=SloSpec(slo_ttft_ms, slo_tpot_ms, slo_ttft_ratio, slo_tpot_ratio),
            sampler=sampler.value, seed=seed, storage=storage, study_name=study_name,
            search_space_path=search_space, sharegpt_path=sharegpt, burstgpt_path=burstgpt,
            tokenizer_path=tokenizer, lora_dist=lora_dist.value if lora_dist else None, lora_rank=lora_rank,
            trial_seconds=trial_seconds, warmup_s=warmup_s, runs_dir=runs_dir, confirm_workloads=confirm,
            objective=objective.value,
        )
        if gpus is not None and gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {gpus}")
        if json_path is not None:  # now, not after an hour of trials
            _check_json(json_path, {_sqlite_file(storage_url(config)): "study database",
                                    runs_dir / "references.json": "reference cache"}, made=runs_dir)
        check_runs_dir(runs_dir)  # before the backend or the study writes there
        given = {"--hardware": hardware is not None, "--profile": profile is not None, "--noise": noise != 0.0,
                 "--no-mps": no_mps, "--vllm-arg": bool(vllm_arg), "--finetune-data": finetune_data is not None,
                 "--gpu-mem-gb": gpu_mem_gb is not None}
        only = {"sim": ("--hardware", "--profile", "--noise"),
                "gpu": ("--no-mps", "--vllm-arg", "--finetune-data", "--gpu-mem-gb")}
        for other, flags in only.items():
            wrong = [f for f in flags if given[f] and other != backend.value]
            if wrong:
                raise UserError(f"{', '.join(wrong)} applies to --backend {other}, not {backend.value}")
        if backend.value == "sim":
            if hardware is not None and profile is not None:
                raise UserError("give --hardware NAME or --profile FILE, not both")
            options = {"profile": profile if profile is not None else hardware, "noise": noise, "gpus": gpus}
        else:
            options = {"runs_dir": runs_dir, "use_mps": not no_mps, "vllm_args": tuple(vllm_arg or ()),
                       "model_path": Path(model) if model and Path(model).is_dir() else None,
                       "finetune_data": finetune_data, "gpus": gpus or 1, "gpu_mem_gb": gpu_mem_gb}
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        _run(config, backend.value, options, trials, json_path, plain, workers)

    command.__doc__ = f"Tune {SYSTEMS[system].title}: {SYSTEMS[system].description}."
    return command


def _check_json(json_path: Path, kept: dict[Path | None, str], made: Path | None = None) -> None:
    """``--json`` can be written, and is none of the files a study keeps
    (``kept``: file -> what it is), which writing it would replace. ``made``:
    the runs folder, which the study makes if it is not there."""

    check_json_path(json_path, made=made)
    for path, what in kept.items():
        if path is not None and path.resolve() == json_path.resolve():
            raise UserError(f"--json {json_path} is the {what}; give another file")


def _sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _run(config, backend_name: str, options: dict, trials: int, json_path: Path | None, plain: bool,
         workers: int = 1) -> None:
    # The table and the lines say it all: a failed trial's reason is stored on
    # it and shown, and Optuna's own warning about it (with the interrupt's
    # traceback) would be drawn over the live table.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    console = Console()
    live = not plain and console.is_terminal
    observer = LiveReporter(console) if live else PlainReporter()
    try:
        if workers > 1:
            devices = visible_devices(os.environ, gpu_count()) if backend_name == "gpu" else ()
            ctx = run_workers(config, backend_name, options, trials, workers, observer, devices,
                              say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        else:
            with make_backend(backend_name, **options) as backend:
                ctx = run_study(config, backend, trials, observer)
    finally:
        if isinstance(observer, LiveReporter):
            observer.close()
    result = StudyResult.of(ctx.study)
    print(summary_text(result))
    if json_path is not None:
        write_json(result, json_path)
        print(f"results written to {json_path}")


for _name in SYSTEMS:
    app.command(name=_name)(_tune(_name))


@app.command(name="figure")
def figure_command(
    figure: Annotated[str, typer.Argument(help="fig8a, fig9a, fig10, fig12 or fig13")],
    systems: Annotated[str, typer.Option(help="'all' or systems separated by commas")] = "all",
    rates: Annotated[Optional[str], typer.Option(help="request rates, req/s, separated by commas (default: the "
                                                 "figure's preset r and r/4, r/2, 3r/4; fig10, fig13: r)")] = None,
    trials: Annotated[Optional[int], typer.Option(min=1, help="trials each study should have (only missing ones "
                                                  "run; default 20; fig12: one per --tasklets)")] = None,
    objective: Annotated[Optional[Objective], typer.Option(help=_OBJECTIVE_HELP + " (default: pareto for fig10, "
                                                           "else peft)")] = None,
    lora_dists: Annotated[Optional[str], typer.Option(help="fig13: served adapters' distributions "
                                                      "(default uniform,skewed,none)")] = None,
    lora_ranks: Annotated[Optional[str], typer.Option(help="fig13: served adapters' ranks (default 8,16,32)")] = None,
    tasklets: Annotated[Optional[str], typer.Option(help="fig12: tasklets between pause points, both passes "
                                                    "(1: after every layer; 33: once per pass; "
                                                    "default 1,2,4,8,16,33)")] = None,
    backend: Annotated[BackendName, typer.Option(help="sim: embedded simulator, studies side by side; "
                                                 "gpu: one after another")] = BackendName["sim"],
    hardware: Annotated[Optional[str], typer.Option(help="sim: packaged hardware profile "
                                                    f"(default {DEFAULT_PROFILE})")] = None,
    out: Annotated[Path, typer.Option(help="FIG.csv, FIG.png, FIG.svg, json/, studies/, "
                                      "logs/")] = Path("autotune-figures"),
    seed: Annotated[int, typer.Option(help="seed of the workloads and samplers")] = 0,
    plain: Annotated[bool, typer.Option(help="one line per finished study instead of the live table")] = False,
    workers: Annotated[Optional[int], typer.Option(help="sim: studies run side by side "
                                                   "(default: the CPU count)")] = None,
    num_prompts: Annotated[Optional[int], typer.Option(help="requests per trial (default: the figure's)")] = None,
    sampler: Annotated[Sampler, typer.Option(help="Optuna sampler")] = Sampler[DEFAULT_SAMPLER],
    slo_ttft_ms: Annotated[Optional[float], typer.Option(help="absolute P99 TTFT limit, ms")] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option(help="absolute P99 TPOT limit, ms")] = None,
    slo_ttft_ratio: Annotated[Optional[float], typer.Option(help="P99 TTFT limit as a multiple of serving alone "
                                                            "(default: the paper's 500 ms)")] = None,
    slo_tpot_ratio: Annotated[Optional[float], typer.Option(help="P99 TPOT limit as a multiple of serving alone "
                                                            "(default: the paper's 50 ms for 8B)")] = None,
    storage: Annotated[Optional[str], typer.Option(help="one Optuna storage URL for every study "
                                                   "(default: a SQLite file per study under OUT/studies)")] = None,
) -> None:
    """Run (or resume) one study per system and request rate (fig13: per served LoRA setting; fig12: one
    sweep) and draw the figure: FIG.csv, FIG.png, FIG.svg."""

    check_figure(figure)
    if figure == "fig12" and trials is not None:
        raise UserError("--trials: fig12 runs one trial per --tasklets value")
    for flag, value, only in (("--lora-dists", lora_dists, "fig13"), ("--lora-ranks", lora_ranks, "fig13"),
                              ("--tasklets", tasklets, "fig12")):
        if value is not None and figure != only:
            raise UserError(f"{flag} applies to {only}, not {figure}")
    sweeps = {}
    if lora_dists is not None:
        sweeps["lora_dists"] = parse_choices(lora_dists, "--lora-dists", LORA_DISTS)
    if lora_ranks is not None:
        sweeps["lora_ranks"] = parse_ints(lora_ranks, "--lora-ranks", allowed=LORA_RANKS)
    if tasklets is not None:
        sweeps["tasklets"] = parse_ints(tasklets, "--tasklets", low=1, high=1024)
    request = FigureRequest(
        figure=figure, systems=parse_systems(systems), rates_req_s=parse_rates(rates) if rates is not None else None,
        trials=trials or 20, out_dir=out, backend=backend.value, hardware=hardware, seed=seed, sampler=sampler.value,
        num_prompts=num_prompts, slo=SloSpec(slo_ttft_ms, slo_tpot_ms, slo_ttft_ratio, slo_tpot_ratio),
        storage=storage, workers=workers if workers is not None else (os.cpu_count() or 1),
        objective=objective.value if objective is not None else None, **sweeps,
    )
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if num_prompts is not None and num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {num_prompts}")
    check_seed(seed)
    run_figure(request, Console(file=sys.stdout), plain)


@app.command()
def workload(
    figure: Annotated[Figure, typer.Argument(help="figure preset")],
    out: Annotated[Path, typer.Option(help="JSON lines file to write")],
    rate: Annotated[Optional[float], typer.Option(help="request rate, req/s")] = None,
    num_prompts: Annotated[Optional[int], typer.Option(help="requests (default: 200 x rate, or the figure's)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    sharegpt: Annotated[Optional[Path], typer.Option()] = None,
    burstgpt: Annotated[Optional[Path], typer.Option()] = None,
    tokenizer: Annotated[Optional[Path], typer.Option()] = None,
    lora_dist: Annotated[Optional[LoraDist], typer.Option()] = None,
    hardware: Annotated[str, typer.Option(help="hardware profile whose preset rate applies")] = DEFAULT_PROFILE,
    system: Annotated[Optional[str], typer.Option(help="the system whose prompts per req/s apply (FineInfer: 400)")] = None,
) -> None:
    """Write a figure's workload, one JSON object per request."""
    fig = get_figure(figure.value)
    if tokenizer is not None and sharegpt is None:
        raise UserError("--tokenizer counts the tokens of --sharegpt prompts; give --sharegpt FILE too")
    prompts_per_rate = get_system(system).prompts_per_rate if system is not None else 200
    if not fig.serves:
        raise UserError(f"{fig.name} has no serving workload")
    if lora_dist is not None and not fig.lora_adapters:
        raise UserError(f"--lora-dist applies to fig13 only, not {fig.name}")
    if rate is None:
        rate, _ = fig.default_rate(hardware)
    n = num_prompts if num_prompts is not None else fig.prompts(rate, prompts_per_rate)  # 0 is refused, not the default
    wl = build_workload(WorkloadOptions(
        arrivals=fig.arrivals, rate_req_s=rate, num_prompts=n, seed=seed, sharegpt_path=sharegpt,
        burstgpt_path=burstgpt, tokenizer_path=tokenizer,
        lora_dist=(lora_dist.value if lora_dist else "uniform") if fig.lora_adapters else None,
    ))
    try:
        wl.write_jsonl(out)
    except OSError as e:
        raise os_error(e, f"cannot write {out}") from None
    print(f"{len(wl)} requests over {wl.duration_s:.1f} s ({wl.description}) written to {out}")


@app.command()
def show(
    study_name: Annotated[str, typer.Argument(help="the study's name (as printed when it ran), or a study's "
                                              "SQLite file (autotune figure's OUT/studies/STUDY.db)")],
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL (default: SQLite under --runs-dir)")] = None,
    runs_dir: Annotated[Path, typer.Option()] = Path("autotune-runs"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="write the results here")] = None,
    pareto: Annotated[bool, typer.Option(help="print the trade-off curves of P99 TTFT and P99 TPOT against "
                                         "PEFT samples/s (all measured trials)")] = False,
) -> None:
    """The trials and best setting of a stored study."""
    name: str | None = study_name
    if storage is None and study_name.endswith(".db") and Path(study_name).is_file():  # a file of one study
        url, name = f"sqlite:///{study_name}", None
    else:
        url = storage or f"sqlite:///{runs_dir / 'studies.db'}"
    if json_path is not None:
        _check_json(json_path, {_sqlite_file(url): "study database"})
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no study database at {url.removeprefix('sqlite:///')}")
    result = load_result(url, name)
    slo = result.slo or {}
    knobs = list(result.rows[0].params) if result.rows else []
    Console().print(trial_table(result.rows, knobs, slo.get("ttft_p99_ms"), slo.get("tpot_p99_ms"), max_rows=None,
                                pareto=result.pareto_numbers if result.objective == "pareto" else None))
    print(summary_text(result))
    if pareto:
        for metric, label in (("ttft_p99_ms", "P99 TTFT"), ("tpot_p99_ms", "P99 TPOT")):
            print(f"trade-off curve ({label} ms vs PEFT samples/s, feasible or not):")
            for r in tradeoff_curve(result.rows, latency=metric):
                print(f"  #{r.number}: {r.metrics.value(metric):.2f} ms, {r.peft_samples_per_s:.3f} samples/s, "
                      f"{r.outcome}; {format_params(r.params)}")
    if json_path is not None:
        write_json(result, json_path)
        print(f"results written to {json_path}")


_COLOCATED_PCTS = ",".join(map(str, DEFAULT_COLOCATED_THREAD_PCTS))  # --colocated-thread-pcts' default


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="profile TOML to write (must not exist); the raw measurements go "
                                      "beside it, OUT's stem + .measurements.json")],
    gpus: Annotated[int, typer.Option(min=1, help="GPUs: tensor parallel serving, one trainer rank each")] = 1,
    model: Annotated[str, typer.Option(help="model preset or local folder")] = "llama-3.1-8b",
    base: Annotated[Optional[str], typer.Option(help="profile giving the datasheet and the unmeasured numbers "
                                                "(default: this GPU's packaged one)")] = None,
    rates: Annotated[str, typer.Option(help="serving-alone rates to measure, req/s, comma-separated")] = "4,24",
    trial_seconds: Annotated[float, typer.Option(help="traffic window of each serving run, s")] = 20.0,
    mps_thread_pcts: Annotated[str, typer.Option(help="MPS active-thread %s to run the trainer alone at "
                                                 "(comma-separated; \"\" for none)")] = "10,40",
    colocated_thread_pcts: Annotated[str, typer.Option(help="MPS active-thread %s of the trainer in the co-located "
                                                       "trials (fig8a, the busiest rate) that fit the contention "
                                                       "terms (comma-separated; \"\" for none)")] = _COLOCATED_PCTS,
    prefill_prompt_tokens: Annotated[int, typer.Option(help="prompt length of the prefill probe (long prompts "
                                                       "one at a time: the prefill's cost), tokens; 0 for none")] = 1536,
    name: Annotated[Optional[str], typer.Option(help="the profile's name (default: the file's stem)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="logs of the runs")] = Path("autotune-runs"),
    refit: Annotated[Optional[Path], typer.Option(help="no GPU: fit again from a calibration's "
                                                  ".measurements.json (its plan, machine and base come from it)")] = None,
) -> None:
    """Measure this GPU (vLLM alone at a few rates and on long prompts, the trainer alone with every thread
    and capped by MPS, both together with the trainer capped) and write a simulator profile whose host-side
    numbers, prefill cost, trainer GPU time and MPS contention terms are fitted to it."""

    raw = out.with_name(out.stem + ".measurements.json")
    for path in (out, raw) if refit is None else (out,):  # a refit measures nothing
        if path.exists():
            raise UserError(f"{path} exists; calibrate never overwrites a profile or its measurements")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise EnvironmentFailure(f"--out {out}: folder {out.parent} is not writable")
    if refit is not None:
        given = [flag for flag, value, default in (
            ("--gpus", gpus, 1), ("--model", model, "llama-3.1-8b"), ("--rates", rates, "4,24"),
            ("--trial-seconds", trial_seconds, 20.0), ("--mps-thread-pcts", mps_thread_pcts, "10,40"),
            ("--colocated-thread-pcts", colocated_thread_pcts, _COLOCATED_PCTS),
            ("--prefill-prompt-tokens", prefill_prompt_tokens, DEFAULT_PREFILL_PROMPT_TOKENS),
            ("--runs-dir", runs_dir, Path("autotune-runs"))) if value != default]
        if given:
            raise UserError(f"--refit takes the plan from {refit}; leave out {', '.join(given)}")
        try:
            text = refit.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--refit {refit}: {e.strerror or e}") from None
        plan, machine, measured_base, measured = load_measurements(text, str(refit))
        base_profile = load_profile(base or measured_base).with_gpus(int(machine.get("gpus", 1)))
        command = f"autotune calibrate --refit {refit.name}"
    else:
        plan = Plan(model, parse_rates(rates), trial_seconds, parse_thread_pcts(mps_thread_pcts),
                    check_prefill_prompt_tokens(prefill_prompt_tokens, ServerConfig.max_model_len),
                    parse_thread_pcts(colocated_thread_pcts, "--colocated-thread-pcts", uncapped=True))
        if not trial_seconds > 0:
            raise UserError(f"--trial-seconds must be positive, got {trial_seconds:g}")
        base_profile, machine, measured = _calibrate_on_gpu(plan, gpus, base, runs_dir)
        _write_new(raw, measurements_json(plan, machine, base_profile.name, measured))
        print(f"measurements written to {raw}")
        command = " ".join(["autotune calibrate", *sys.argv[2:]]) if sys.argv[1:2] == ["calibrate"] else "autotune calibrate"
    targets = targets_of(measured)
    if not targets:
        raise UserError("every calibration run crashed; see the logs under --runs-dir")
    print(f"fitting {len(targets)} measured numbers ...")
    result = fit_measured(base_profile, targets)
    _write_new(out, profile_toml(name or out.stem, base_profile, result, machine, measured, command))
    for key, value in result.fields.items():
        print(f"  {key} = {value:.4g}")
    for key, rel in result.residuals.items():
        print(f"  {key}: simulated {rel:+.1%}")
    print(f"profile written to {out}; use it with --profile {out}")


def _calibrate_on_gpu(plan, gpus: int, base: str | None, runs_dir: Path):
    """(base profile, machine, measured): the plan's measurements through the GPU backend."""
    check_runs_dir(runs_dir)
    model_config = resolve_model(plan.model)
    with make_backend("gpu", runs_dir=runs_dir, gpus=gpus,
                      model_path=Path(plan.model) if Path(plan.model).is_dir() else None) as backend:
        if base is None:
            hw = backend.hardware
            base = next((p for p in (f"{hw}-datasheet", hw) if p in packaged_profiles()), None)
            if base is None:
                raise UserError(f"no packaged profile for {hw}; give --base FILE with its [datasheet]")
        base_profile = load_profile(base).with_gpus(gpus)
        print(f"calibrating {backend.hardware} on {model_config.name}; base profile {base}")
        measured = measure(backend.run_trial, plan.specs(model_config))
        info = backend.describe()
    machine = {"gpu": info.get("gpu"), "gpus": gpus, "memory_mib": info.get("gpu_memory_mib"),
               "driver": gpu_driver(), "cuda": info.get("cuda"), "torch": info.get("torch"), "vllm": info.get("vllm"),
               "cpu": info.get("cpu")}
    return base_profile, machine, measured


def _write_new(path: Path, text: str) -> None:
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise os_error(e, f"cannot write {path}") from None


@app.command(name="list")
def list_presets() -> None:
    """The systems, their knobs and search ranges, the figures, and the hardware profiles."""
    print("systems:")
    for name in SYSTEMS:
        system = get_system(name)
        space = system.search_space()
        knobs = "; ".join(f"{k.name} {k.describe_range()} (default {k.default:g})" for k in space)
        print(f"  {name:16s} {knobs}")
    print("figures:")
    for fig in FIGURES.values():
        print(f"  {fig.name:16s} {fig.description}")
    print("hardware profiles (--hardware; [how many numbers of each provenance]):")
    for name in packaged_profiles():
        p = load_profile(name)
        default = " (default)" if name == DEFAULT_PROFILE else ""
        print(f"  {name:16s} {p.describe()}{default}")
        print(f"  {'':16s} {p.provenance}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``autotune`` script."""
    app(args=argv, prog_name="autotune")
