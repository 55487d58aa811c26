#!/usr/bin/env bash
# Runs our `sdxl bench --json` and PyTorch's `torch_baseline.py` on the same rows (components,
# shapes, dtypes, repeats, threads), in one go on this machine, one component at a time
# (ours, then torch's, so that both see the same background load), and prints ours/torch per
# row (joined on component, op, dtype, shape) with the GFLOP/s and peak RSS of both. Our text
# encoders' `prompt` rows (only what SDXL reads) are joined with torch's `forward` rows, the
# call diffusers' encode_prompt makes.
#
#   bench/compare.sh [--model DIR] [--refiner DIR] [--out DIR] [bench flags …]
#   bench/compare.sh --join DIR      # only print the table of DIR/{ours,torch}.jsonl
#
# Bench flags are passed to both sides: --components --dtypes --refiner-dtypes --unet-sizes
# --refiner-sizes --vae-sizes --vae-encode-px --matmul-sizes --batch --repeats --warmup
# --threads. `--rounds N` (default 1) runs each component's pair (ours, then torch's) N times in
# a row, so that a drift of the VM's speed falls on both sides alike; the table then takes each
# side's median over all its samples and notes the ratio of each round. The `pipeline` component (whole generations: txt2img, and txt2img+refiner with
# --refiner) runs ours once per --pipeline-modes entry (default `resident,low-memory`: the
# second adds `sdxl bench --low-memory`) and torch's side with bench/torch_pipeline.py, both
# with --pipeline-px --pipeline-steps --dtypes --repeats --warmup --threads.
# Environment: PY (a python with torch/diffusers/transformers; default ../venv/bin/python),
# TORCH_BASELINE (default ../shared/bench/torch_baseline.py), SDXL_FULL (default ../full: the
# folder holding base-diffusers/ and refiner-diffusers/), TORCH_ARGS (extra torch flags),
# QUIET_WAIT (before each side of each component, wait up to this many seconds until other
# processes use under 0.3 cores; default 0). Relative paths are from the repository root.
#
# torch builds its weights from the same seed as the saved folders (torch_baseline.py --save),
# so both sides compute with identical values. The raw lines are kept in --out
# (default bench/results/<UTC time>/{ours,torch}.jsonl).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-../venv/bin/python}
TORCH_BASELINE=${TORCH_BASELINE:-../shared/bench/torch_baseline.py}
SDXL_FULL=${SDXL_FULL:-../full}
MODEL=$SDXL_FULL/base-diffusers
REFINER=""
OUT=""
JOIN=""
COMPONENTS=""
PIPELINE_MODES=resident,low-memory
ROUNDS=1
COMMON=()
PIPELINE_ARGS=()
TORCH_PIPELINE_ARGS=()

while [ $# -gt 0 ]; do
    flag=$1
    value=""
    case $flag in
        --*=*) value=${flag#*=}; flag=${flag%%=*}; shift ;;
        --*) [ $# -ge 2 ] || { echo "compare.sh: $flag needs a value" >&2; exit 2; }
             value=$2; shift 2 ;;
        *) echo "compare.sh: unexpected argument $flag" >&2; exit 2 ;;
    esac
    case $flag in
        --model) MODEL=$value ;;
        --refiner) REFINER=$value ;;
        --out) OUT=$value ;;
        --join) JOIN=$value ;;
        --components) COMPONENTS=$value ;;
        --pipeline-modes) PIPELINE_MODES=$value ;;
        --rounds) ROUNDS=$value ;;
        --pipeline-px|--pipeline-steps) PIPELINE_ARGS+=("$flag" "$value") ;;
        --dtypes|--repeats|--warmup|--threads)
            COMMON+=("$flag" "$value"); TORCH_PIPELINE_ARGS+=("$flag" "$value") ;;
        *) COMMON+=("$flag" "$value") ;;
    esac
done
if [ -z "$COMPONENTS" ]; then
    COMPONENTS=unet,vae,text_encoder,text_encoder_2
    [ -n "$REFINER" ] && COMPONENTS=$COMPONENTS,refiner_unet
fi
# Busy CPU ticks of the whole machine (/proc/stat minus idle and iowait).
busy_ticks() {
    local _ user nice system idle iowait rest
    read -r _ user nice system idle iowait rest </proc/stat
    local sum=$((user + nice + system))
    for v in $rest; do sum=$((sum + v)); done
    echo "$sum"
}

# Waits up to QUIET_WAIT seconds until the machine is nearly idle (nothing of ours runs now).
wait_quiet() {
    local waited=0 b0 b1
    while [ "$waited" -lt "${QUIET_WAIT:-0}" ]; do
        b0=$(busy_ticks); sleep 2; b1=$(busy_ticks)
        # USER_HZ = 100: under 0.3 cores over 2 s is under 60 ticks.
        [ $((b1 - b0)) -lt 60 ] && return
        waited=$((waited + 2))
    done
}

# Prints the joined table of an ours.jsonl and a torch.jsonl.
join_table() {
    "$PY" - "$1" "$2" <<'PYEOF'
import json, sys

def merged(rs):
    # Several rounds of one row: the median over all their samples, the ratio of each round
    # kept in "rounds", the largest peaks.
    ms = [r for r in rs if r["kind"] == "measure"]
    if len(ms) < 2:
        return ms[0] if ms else rs[0]
    m = dict(ms[0])
    times = sorted(t for r in ms for t in (r.get("times_s") or [r["median_s"]]))
    n = len(times)
    m["median_s"] = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
    m["min_s"], m["max_s"] = times[0], times[-1]
    m["rounds"] = [r["median_s"] for r in ms]
    if m.get("gflop"):
        m["gflops_per_s_median"] = m["gflop"] / m["median_s"]
    for f in ("peak_rss_gib", "process_peak_rss_gib"):
        m[f] = max((r.get(f) for r in ms if r.get(f) is not None), default=None)
    for f in ("own_cores", "others_cores"):
        vals = [r[f] for r in ms if r.get(f) is not None]
        m[f] = sum(vals) / len(vals) if vals else None
    return m

def rows(path):
    groups, machine = {}, None
    for line in open(path):
        r = json.loads(line)
        if r.get("kind") == "machine":
            machine = machine or r
        if r.get("kind") in ("measure", "error") and "op" in r:
            groups.setdefault((r["component"], r["op"], r["dtype"], r["shape"]), []).append(r)
    return [(k, merged(rs)) for k, rs in groups.items()], machine

ours, m_ours = rows(sys.argv[1])
torch_rows, m_torch = rows(sys.argv[2])
torch = dict(torch_rows)
for name, m in (("ours", m_ours), ("torch", m_torch)):
    if m:
        print(f"{name}: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, "
              f"threads {m.get('threads', m.get('torch_threads'))}, load {m.get('loadavg_1m')}, "
              f"{m.get('time', '')}")
print()
head = ("component", "op", "dtype", "shape", "ours s", "torch s", "ours/torch",
        "CPU-s ours/torch", "GFLOP", "ours GFLOP/s", "torch GFLOP/s", "ours RSS", "torch RSS",
        "ours process peak", "torch process peak", "cores own/others ours", "torch", "note")
print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" if i < 4 or i == len(head) - 1 else "---:" for i in range(len(head))) + "|")

def fmt(v, d):
    return "-" if v is None else f"{v:.{d}f}"

def ok(r):
    return r if r and r["kind"] == "measure" else {}

ours_keys = {k for k, _ in ours}
def counterpart(k):
    # Our text encoders' "prompt" row (only what SDXL reads) against torch's "forward" row:
    # diffusers' encode_prompt makes exactly that call.
    if k[1] == "prompt" and k not in torch:
        return torch.get((k[0], "forward", k[2], k[3]))
    return torch.get(k)

pairs = [(k, o, counterpart(k)) for k, o in ours] + [(k, None, t) for k, t in torch_rows if k not in ours_keys]
for key, o, t in pairs:
    om, tm = ok(o).get("median_s"), ok(t).get("median_s")
    # CPU seconds per run (median x cores this process kept busy): fairer than wall time when
    # the two sides got different shares of a contended machine.
    oc, tc = ok(o).get("own_cores"), ok(t).get("own_cores")
    g_o, g_t = ok(o).get("gflop"), ok(t).get("gflop")
    notes = [f"{n} error: {r['error']}" for n, r in (("ours", o), ("torch", t))
             if r and r["kind"] == "error"]
    if key[1] == "prompt" and t:
        notes.append("torch: its full forward, as diffusers' encode_prompt calls it")
    if g_o and g_t and abs(g_o - g_t) > 0.005 * g_t:
        notes.append(f"GFLOP differ: torch {g_t:.1f}")
    r_o, r_t = ok(o).get("rounds"), ok(t).get("rounds")
    if r_o and r_t and len(r_o) == len(r_t):
        notes.append("rounds " + ", ".join(f"{a / b:.2f}" for a, b in zip(r_o, r_t)))
    cores = lambda r: "-" if "own_cores" not in r else f"{fmt(r['own_cores'], 2)}/{fmt(r['others_cores'], 2)}"
    op = key[1] + (" (ours low-memory)" if (o or {}).get("low_memory") else "")
    cells = [key[0], op, key[2], key[3]] + [
        fmt(om, 3), fmt(tm, 3),
        fmt(om / tm if om and tm else None, 2),
        fmt((om * oc) / (tm * tc) if om and tm and oc and tc else None, 2),
        fmt(g_o if g_o is not None else g_t, 1),
        fmt(ok(o).get("gflops_per_s_median"), 0), fmt(ok(t).get("gflops_per_s_median"), 0),
        fmt(ok(o).get("peak_rss_gib"), 2), fmt(ok(t).get("peak_rss_gib"), 2),
        fmt(ok(o).get("process_peak_rss_gib"), 2), fmt(ok(t).get("process_peak_rss_gib"), 2),
        cores(ok(o)), cores(ok(t)), "; ".join(notes)]
    print("| " + " | ".join(cells) + " |")
print("\nours/torch > 1: ours is slower (wall time; CPU-s: median x own cores, i.e. per CPU "
      "second used). RSS: peak GiB over warm-up and timed runs, weights included; process "
      "peak: the process's peak up to the end of the row, loading included.")
PYEOF
}

if [ -n "$JOIN" ]; then
    join_table "$JOIN/ours.jsonl" "$JOIN/torch.jsonl"
    exit
fi

OUT=${OUT:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OURS_JSONL=$OUT/ours.jsonl
TORCH_JSONL=$OUT/torch.jsonl
: >"$OURS_JSONL"
: >"$TORCH_JSONL"

MODEL_FLAGS=(--model "$MODEL")
[ -n "$REFINER" ] && MODEL_FLAGS+=(--refiner "$REFINER")

echo "building sdxl (release)…" >&2
cargo build --release -q -p sdxl-cli

# Our bench on one component, its lines appended to ours.jsonl.
ours() {
    cargo run --release -q -p sdxl-cli -- bench --json "${MODEL_FLAGS[@]}" --components "$@" \
        ${COMMON[@]+"${COMMON[@]}"} | tee -a "$OURS_JSONL" \
        || echo "{\"kind\": \"error\", \"component\": \"$1\", \"error\": \"sdxl bench exited with an error\"}" >>"$OURS_JSONL"
}

IFS=, read -r -a LIST <<<"$COMPONENTS"
for c in "${LIST[@]}"; do
    for _ in $(seq "$ROUNDS"); do
        if [ "$c" = pipeline ]; then
            IFS=, read -r -a MODES <<<"$PIPELINE_MODES"
            for mode in "${MODES[@]}"; do
                wait_quiet
                echo "== pipeline: ours ($mode)" >&2
                case $mode in
                    resident) ours pipeline ${PIPELINE_ARGS[@]+"${PIPELINE_ARGS[@]}"} ;;
                    low-memory) ours pipeline ${PIPELINE_ARGS[@]+"${PIPELINE_ARGS[@]}"} --low-memory ;;
                    *) echo "compare.sh: --pipeline-modes takes resident and low-memory, not $mode" >&2; exit 2 ;;
                esac
            done
            wait_quiet
            echo "== pipeline: torch" >&2
            "$PY" bench/torch_pipeline.py "${MODEL_FLAGS[@]}" ${PIPELINE_ARGS[@]+"${PIPELINE_ARGS[@]}"} \
                ${TORCH_PIPELINE_ARGS[@]+"${TORCH_PIPELINE_ARGS[@]}"} \
                | grep '^{' | tee -a "$TORCH_JSONL" \
                || echo '{"kind": "error", "component": "pipeline", "error": "torch_pipeline.py exited with an error"}' >>"$TORCH_JSONL"
            continue
        fi
        wait_quiet
        echo "== $c: ours" >&2
        ours "$c"
        wait_quiet
        echo "== $c: torch" >&2
        # shellcheck disable=SC2086  # TORCH_ARGS is a list of flags
        "$PY" "$TORCH_BASELINE" --components "$c" ${COMMON[@]+"${COMMON[@]}"} ${TORCH_ARGS:-} \
            | grep '^{' | tee -a "$TORCH_JSONL" \
            || echo "{\"kind\": \"error\", \"component\": \"$c\", \"error\": \"torch_baseline.py exited with an error\"}" >>"$TORCH_JSONL"
    done
done

join_table "$OURS_JSONL" "$TORCH_JSONL"
echo "raw lines: $OURS_JSONL $TORCH_JSONL" >&2
