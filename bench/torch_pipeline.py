#!/usr/bin/env python3
"""Whole SDXL text-to-image generations in diffusers, timed like `sdxl bench --components
pipeline`: the PyTorch side of bench/compare.sh's `pipeline` rows.

Loads StableDiffusionXLPipeline from --model (and, with --refiner, StableDiffusionXLImg2ImgPipeline
from --refiner), then per dtype times one generation as our bench's `pipeline` rows do, with the
same settings: prompt "a photo of a cat", no negative prompt, the model's own scheduler
(Euler for SDXL), guidance 5, one image, seed 0, --pipeline-px square, --pipeline-steps steps;
`txt2img` is the base alone (decoded to a PIL image), `txt2img+refiner` hands the latents over
at 0.8 of the schedule (denoising_end / denoising_start) and the refiner decodes. Each model is
loaded from its own folder, as ours does (diffusers' docs pass the base's text_encoder_2 and
vae to the refiner instead, which saves their memory).

Prints one JSON line per event in the shape of `sdxl bench --json` (kind machine, load,
measure, error, done), so that compare.sh joins the rows on (component, op, dtype, shape).
Peak RSS is read as torch_baseline.py reads it (its own functions): VmHWM after a reset
(/proc/self/clear_refs) just before each row's first run, so it includes the loaded weights;
process_peak_rss_gib is the process's peak so far, loading included. FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on meta copies of the text encoders, UNets and VAE
with the arguments each received in the first run, times the number of calls, so the timed
runs carry no counter.

  $PY bench/torch_pipeline.py --model $SDXL_FULL/base-diffusers \\
      --refiner $SDXL_FULL/refiner-diffusers --dtypes f32 --pipeline-px 512 \\
      --pipeline-steps 2 --repeats 1 --warmup 0 --threads 2

Environment: TORCH_BASELINE (default ../shared/bench/torch_baseline.py from the repository
root) for the RSS, machine and CPU accounting helpers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT = "a photo of a cat"  # examples/sdxl-cli/src/bench/components.rs PIPELINE_PROMPT
SEED = 0  # GenerateParams::new's seed
GUIDANCE = 5.0  # GenerateParams::new's guidance_scale (diffusers' default too)
REFINER_START = 0.8  # components.rs REFINER_START
DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ROOT = Path(__file__).resolve().parent.parent


def load_baseline():
    """torch_baseline.py as a module, for its RSS, machine and CPU-time helpers."""
    path = Path(os.environ.get("TORCH_BASELINE", ROOT.parent / "shared/bench/torch_baseline.py"))
    spec = importlib.util.spec_from_file_location("torch_baseline", path)
    if spec is None or not path.is_file():
        sys.exit(f"torch_pipeline.py: {path} not found (set TORCH_BASELINE)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tb = load_baseline()


def emit(rec: dict, out):
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def to_meta(value):
    """The same structure with every tensor replaced by an empty one of its shape on 'meta'
    (floats as float32, the dtype of the meta copies: FLOPs do not depend on it)."""
    if isinstance(value, torch.Tensor):
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        return torch.empty(value.shape, dtype=dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


class CallCounter:
    """Counts calls of `obj.<method>` during one run and keeps the first call's arguments."""

    def __init__(self, obj, method: str):
        self.obj, self.method, self.calls, self.first = obj, method, 0, None
        self.original = getattr(obj, method)

        def counted(*args, **kwargs):
            self.calls += 1
            if self.first is None:
                self.first = (to_meta(args), to_meta(kwargs))
            return self.original(*args, **kwargs)

        setattr(obj, method, counted)

    def remove(self):
        # The wrapper is an instance attribute shadowing the class's method.
        delattr(self.obj, self.method)

    def flops(self):
        """(FLOPs of all calls, by aten op) from one call on a meta copy of the module."""
        if not self.calls:
            return 0, {}
        from torch.utils.flop_counter import FlopCounterMode
        import transformers

        m = self.obj
        with torch.device("meta"):
            if isinstance(m, transformers.PreTrainedModel):
                twin = type(m)(m.config)
            else:
                twin = type(m).from_config(m.config)
        twin = twin.eval()
        args, kwargs = self.first
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            getattr(twin, self.method)(*args, **kwargs)
        by_op = {str(k).replace("aten.", ""): v * self.calls
                 for k, v in fc.get_flop_counts().get("Global", {}).items()}
        return fc.get_total_flops() * self.calls, by_op


def counters(pipes):
    """Call counters on every text encoder, UNet and VAE decode of the pipelines."""
    out = []
    for pipe in pipes:
        for name in ("text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                out.append(CallCounter(module, "forward"))
        out.append(CallCounter(pipe.vae, "decode"))
    return out


def measure(fn, warmup: int, repeats: int, count):
    """Runs `fn` warmup + repeats times (the first run under `count`, a list of counters made by
    `count()` and removed after it); returns (times, warmup times, contention, counters)."""
    first = count()
    wtimes = []
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        wtimes.append(time.perf_counter() - t0)
        if i == 0:
            for c in first:
                c.remove()
    times = []
    w0, c0, b0 = tb._cpu_snapshot()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if warmup == 0 and i == 0:
            for c in first:
                c.remove()
    w1, c1, b1 = tb._cpu_snapshot()
    wall = w1 - w0
    cont = dict(own_cores=round((c1 - c0) / wall, 2) if wall >= 0.2 else None,
                others_cores=round(max(0.0, (b1 - b0) - (c1 - c0)) / wall, 2) if wall >= 0.2 else None)
    return times, wtimes, cont, first


def row(op, dt_name, px, steps, run, pipes, a, out):
    tb.reset_peak_rss()
    rss_before = tb.rss_gib()
    try:
        times, wtimes, cont, counted = measure(run, a.warmup, a.repeats, lambda: counters(pipes))
    except Exception as e:  # a failed row is reported and the run goes on, as ours does
        emit(dict(kind="error", component="pipeline", op=op, dtype=str(DT[dt_name]).replace("torch.", ""),
                  shape=f"1x3x{px}x{px}", error=str(e).splitlines()[0] if str(e) else repr(e)), out)
        return
    peak = tb.rss_gib("VmHWM")
    total, by_op = 0, {}
    for c in counted:
        f, ops = c.flops()
        total += f
        for k, v in ops.items():
            by_op[k] = by_op.get(k, 0) + v
    med, best = statistics.median(times), min(times)
    g = total / 1e9
    emit(dict(kind="measure", component="pipeline", op=op, dtype=str(DT[dt_name]).replace("torch.", ""),
              shape=f"1x3x{px}x{px}", threads=torch.get_num_threads(), repeats=len(times),
              median_s=round(med, 4), min_s=round(best, 4), max_s=round(max(times), 4),
              times_s=[round(t, 4) for t in times], warmup_s=[round(t, 3) for t in wtimes],
              gflop=round(g, 2), gflop_by_op={k: round(v / 1e9, 2) for k, v in sorted(by_op.items())},
              gflops_per_s_median=round(g / med, 1), gflops_per_s_best=round(g / best, 1),
              peak_rss_gib=round(peak, 2), rss_before_gib=round(rss_before, 2),
              process_peak_rss_gib=round(tb._MAX_HWM[0], 2), loadavg_1m=round(tb.loadavg(), 2),
              time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **cont, px=px, steps=steps), out)


def load(kind, path, dt_name, out):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "pipeline" else StableDiffusionXLImg2ImgPipeline
    t0 = time.perf_counter()
    pipe = cls.from_pretrained(path, dtype=DT[dt_name], use_safetensors=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    emit(dict(kind="load", component=kind, dtype=str(DT[dt_name]).replace("torch.", ""),
              load_s=round(time.perf_counter() - t0, 1), rss_gib=round(tb.rss_gib(), 2)), out)
    return pipe


def main(argv=None):
    csv = lambda s: [x for x in s.split(",") if x]
    full = os.environ.get("SDXL_FULL", str(ROOT.parent / "full"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=f"{full}/base-diffusers", help="SDXL base diffusers folder")
    ap.add_argument("--refiner", default=None, help="SDXL refiner folder: adds the txt2img+refiner row")
    ap.add_argument("--dtypes", type=csv, default=["f32", "bf16"], help="f32,bf16,f16")
    ap.add_argument("--pipeline-px", type=int, default=512)
    ap.add_argument("--pipeline-steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch default")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = open(a.out, "a") if a.out else None
    emit(tb.machine_info(), out)
    px, steps = a.pipeline_px, a.pipeline_steps
    for dt_name in a.dtypes:
        base = load("pipeline", a.model, dt_name, out)

        def base_only():
            g = torch.Generator("cpu").manual_seed(SEED)
            base(prompt=PROMPT, height=px, width=px, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 generator=g)

        with torch.inference_mode():
            row("txt2img", dt_name, px, steps, base_only, [base], a, out)
        if a.refiner:
            refiner = load("pipeline refiner", a.refiner, dt_name, out)

            def with_refiner():
                g = torch.Generator("cpu").manual_seed(SEED)
                latents = base(prompt=PROMPT, height=px, width=px, num_inference_steps=steps,
                               guidance_scale=GUIDANCE, denoising_end=REFINER_START, output_type="latent",
                               generator=g).images
                refiner(prompt=PROMPT, image=latents, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        denoising_start=REFINER_START, generator=g)

            with torch.inference_mode():
                row("txt2img+refiner", dt_name, px, steps, with_refiner, [base, refiner], a, out)
            del refiner
        del base
    tb.rss_gib("VmHWM")
    emit(dict(kind="done", process_peak_rss_gib=round(tb._MAX_HWM[0], 2)), out)
    if out:
        out.close()


if __name__ == "__main__":
    main()
