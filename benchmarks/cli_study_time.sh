#!/usr/bin/env bash
# Wall time of the whole process `autotune llmstation --figure fig8a --trials 40`
# (start-up, reference runs, 40 simulated trials, summary), on the embedded
# simulator. Each run gets a fresh --runs-dir, so nothing is resumed or cached.
# Target (issue 2): <= 60 s on a 2-core CPU machine.
#
#   bash benchmarks/cli_study_time.sh            # 3 runs; writes benchmarks/results/cli_study_time.{json,md}
#   SAMPLER=gp bash benchmarks/cli_study_time.sh # adds --sampler gp; writes cli_study_time.gp.{json,md}
#   RUNS=1 OUT_DIR=/tmp/x bash benchmarks/cli_study_time.sh
set -euo pipefail

RUNS=${RUNS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_DIR=${OUT_DIR:-$HERE/results}
SAMPLER=${SAMPLER:-}  # empty: the CLI's default sampler
CMD=(autotune llmstation --figure fig8a --trials 40 --plain)
NAME=cli_study_time
if [[ -n "$SAMPLER" ]]; then
  CMD+=(--sampler "$SAMPLER")
  NAME=cli_study_time.$SAMPLER
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR"

for i in $(seq 1 "$RUNS"); do
  cut -d' ' -f1 /proc/loadavg >"$WORK/load.$i"  # 1-min load average before the run (other work on the machine)
  # /usr/bin/time -v: wall, user, sys, max RSS of the process and its children
  /usr/bin/time -v -o "$WORK/time.$i" "${CMD[@]}" --runs-dir "$WORK/runs.$i" >"$WORK/out.$i" 2>&1
  grep -E "Elapsed \(wall clock\)" "$WORK/time.$i" | sed "s/^\s*/run $i: /"
done

python - "$WORK" "$RUNS" "$OUT_DIR" "${CMD[*]} --runs-dir <fresh dir>" "$NAME" "${SAMPLER:+SAMPLER=$SAMPLER }" <<'EOF'
import json, os, platform, re, statistics, sys
from pathlib import Path

work, runs, out_dir, cmd, name, env = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]

def field(text, name):
    m = re.search(rf"^\s*{re.escape(name)}: (.*)$", text, re.M)
    return m.group(1).strip()

def wall_s(s):  # "m:ss.ss" or "h:mm:ss"
    parts = [float(p) for p in s.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))

cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")), "unknown")
rows = []
for i in range(1, runs + 1):
    t = (work / f"time.{i}").read_text()
    out = (work / f"out.{i}").read_text().splitlines()
    rows.append({
        "run": i,
        "wall_s": wall_s(field(t, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
        "user_s": float(field(t, "User time (seconds)")),
        "sys_s": float(field(t, "System time (seconds)")),
        "max_rss_kib": int(field(t, "Maximum resident set size (kbytes)")),
        "exit_status": int(field(t, "Exit status")),
        "loadavg_1m_before": float((work / f"load.{i}").read_text()),
        "summary": [l for l in out if l.startswith(("study ", "SLO:", "best", "  PEFT", "  =", "no setting"))],
    })
walls = [r["wall_s"] for r in rows]
report = {
    "benchmark": "cli_study_time",
    "command": cmd,
    "script": f"{env}bash benchmarks/cli_study_time.sh",
    "machine": {"nproc": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
                "platform": platform.platform()},
    "target_wall_s": 60.0,
    "median_wall_s": statistics.median(walls),
    "runs": rows,
}
(out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
m = report["machine"]
md = [
    "# CLI study wall time",
    "",
    f"Command (each run with a fresh `--runs-dir`, so no resume and no cached reference runs): `{cmd}`",
    "",
    f"Script: `{report['script']}`, timed with `/usr/bin/time -v` (whole process, start-up included).",
    "",
    f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}. The machine was "
    "shared with other work (1-min load average before each run below); user + sys is the process's own CPU time.",
    "",
    f"**Median wall: {report['median_wall_s']:.1f} s** over {runs} runs (target <= 60 s on 2 cores: "
    f"{'met' if report['median_wall_s'] <= 60 else 'MISSED'}).",
    "",
    "| run | wall (s) | user (s) | sys (s) | max RSS (MiB) | exit | 1-min load before |",
    "|---:|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    md.append(f"| {r['run']} | {r['wall_s']:.2f} | {r['user_s']:.2f} | {r['sys_s']:.2f} | "
              f"{r['max_rss_kib'] / 1024:.0f} | {r['exit_status']} | {r['loadavg_1m_before']:.2f} |")
md += ["", "Summary printed by run 1:", "", "```", *rows[0]["summary"], "```", ""]
(out_dir / f"{name}.md").write_text("\n".join(md))
print(f"median wall {report['median_wall_s']:.2f} s; written to {out_dir}/{name}.{{json,md}}")
EOF
