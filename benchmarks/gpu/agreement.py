"""Our load generator against vLLM's own ``vllm bench serve``: same server,
same request shapes and rate; TTFT and TPOT at P50 and P99 side by side.

    python benchmarks/gpu/agreement.py --model llama-3.1-8b --rate 8 --num-prompts 300 --out DIR

Target (issue: GPU backend): within 5% at P50 and 10% at P99.

Both send what ``autotune.gpu.loadgen.request_body`` sends (greedy, EOS
ignored: vLLM 0.20's ``vllm bench serve`` samples at the server's default
temperature unless told, ``bench_sampling_flags``), to one server with prefix
caching off, and every run gets prompt seeds no other run uses, so that no run
is served from blocks an earlier one cached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from autotune.gpu.loadgen import replay_sync, request_body
from autotune.gpu.modelfiles import write_model_folder
from autotune.gpu.procs import ProcessRegistry
from autotune.gpu.server import ServerConfig, ServerKeeper
from autotune.metrics import serving_metrics
from autotune.models import from_name
from autotune.workloads.arrivals import poisson_arrivals
from autotune.workloads.spec import RequestSpec, Workload


# request_body's sampling fields -> vllm bench serve's flags for them
# (vllm/benchmarks/serve.py, 0.20: the "sampling parameters" group)
_BENCH_SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                         "min_p": "--min-p", "frequency_penalty": "--frequency-penalty",
                         "presence_penalty": "--presence-penalty", "repetition_penalty": "--repetition-penalty"}


def bench_sampling_flags() -> list[str]:
    """``vllm bench serve`` flags that sample as our load generator does: the
    sampling fields of ``request_body`` (greedy), plus ``--ignore-eos``."""
    body = request_body(RequestSpec(0.0, 1, 1), [0], "model")
    flags = [arg for key, flag in _BENCH_SAMPLING_FLAGS.items() if key in body for arg in (flag, f"{body[key]:g}")]
    assert "--temperature" in flags, "without one, vllm bench serve samples at the server's default temperature"
    return flags + (["--ignore-eos"] if body.get("ignore_eos") else [])


def ours(url: str, model, rate: float, n: int, input_len: int, output_len: int, seed: int,
         prompt_seed: int, as_text: bool = True) -> dict:
    """Our load generator: Poisson arrivals from ``seed``, prompts from ``prompt_seed``."""
    arrivals = poisson_arrivals(n, rate, seed=seed)
    wl = Workload(tuple(RequestSpec(float(t), input_len, output_len) for t in arrivals), rate, seed, True,
                  f"{n} requests, {input_len}/{output_len} tokens, Poisson {rate:g} req/s")
    res = replay_sync(url, wl, model_name=model.name, vocab_size=model.vocab_size, seed=prompt_seed,
                      prompt_as_text=as_text)
    m = serving_metrics(res.records)
    return {"ttft_p50_ms": m.ttft.p50_ms, "ttft_p99_ms": m.ttft.p99_ms, "tpot_p50_ms": m.tpot.p50_ms,
            "tpot_p99_ms": m.tpot.p99_ms, "completed": m.completed, "failed": m.failed}


def vllm_bench(url: str, model, folder: Path, rate: float, n: int, input_len: int, output_len: int,
               seed: int, out: Path, log: Path) -> dict:
    result = out / f"vllm-bench-{int(time.time())}.json"
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
            "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", model.name, "--tokenizer", str(folder),
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "0",
            "--num-prompts", str(n), "--request-rate", str(rate), "--seed", str(seed), *bench_sampling_flags(),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(out), "--result-filename", result.name]
    with open(log, "a") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=900)
    r = json.loads(result.read_text())
    return {"ttft_p50_ms": r["median_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "tpot_p50_ms": r["median_tpot_ms"], "tpot_p99_ms": r["p99_tpot_ms"],
            "completed": r["completed"], "failed": r.get("failed", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--num-prompts", type=int, default=300)
    ap.add_argument("--input-len", type=int, default=215)
    ap.add_argument("--output-len", type=int, default=198)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = from_name(args.model)
    folder = write_model_folder(model, args.out / "model", tokenizer=True)
    with ProcessRegistry() as procs:
        keeper = ServerKeeper(args.out, procs)
        t0 = time.monotonic()
        server = keeper.ensure(ServerConfig(model=str(folder), served_model_name=model.name, dummy_weights=True,
                                            has_tokenizer=True, gpu_memory_utilization=0.9,
                                            enable_prefix_caching=False))
        startup_s = time.monotonic() - t0
        print(f"server ready in {startup_s:.1f} s", flush=True)
        # prompt seeds: the warm-up 0, round r's vllm bench serve 2r + 1 and ours 2r + 2 (none repeats)
        ours(server.url, model, args.rate, 50, args.input_len, args.output_len, seed=99, prompt_seed=0)  # warm-up
        rows = []
        for r in range(args.rounds):  # alternate, so drift hits both alike
            b = vllm_bench(server.url, model, folder, args.rate, args.num_prompts, args.input_len,
                           args.output_len, 2 * r + 1, args.out, args.out / "vllm-bench.log")
            o = ours(server.url, model, args.rate, args.num_prompts, args.input_len, args.output_len, seed=r,
                     prompt_seed=2 * r + 2)
            rows.append({"round": r, "vllm_bench_serve": b, "autotune_loadgen": o})
            print(json.dumps(rows[-1]), flush=True)
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
    med = {src: {k: float(np.median([row[src][k] for row in rows])) for k in keys}
           for src in ("vllm_bench_serve", "autotune_loadgen")}
    table = ["| metric | vllm bench serve | autotune loadgen | difference | target |", "|---|---|---|---|---|"]
    for k in keys:
        a, b = med["vllm_bench_serve"][k], med["autotune_loadgen"][k]
        table.append(f"| {k} | {a:.2f} | {b:.2f} | {100 * (b - a) / a:+.1f}% | {'±5%' if 'p50' in k else '±10%'} |")
    doc = {"model": args.model, "rate_req_s": args.rate, "num_prompts": args.num_prompts,
           "input_len": args.input_len, "output_len": args.output_len, "server_startup_s": startup_s,
           "prefix_caching": server.config.prefix_caching, "server_flags": server.config.flags(),
           "vllm_bench_sampling_flags": bench_sampling_flags(),
           "rounds": rows, "median": med, "command": " ".join(sys.argv)}
    (args.out / "agreement.json").write_text(json.dumps(doc, indent=2))
    (args.out / "agreement.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
