"""Runs of the tiny fixture model through the Python binding: parity with the diffusers
goldens, cancellation three ways, jobs, callbacks, buffers and errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import sdxl

from conftest import fixtures_root, manifest, model_dir, read_safetensors

# Small runs for the behaviour tests: size and steps of the first t2i case of the manifest.
_FIRST = manifest()["t2i"][0]["kwargs"]
SMALL = {
    "width": _FIRST["width"],
    "height": _FIRST["height"],
    "num_inference_steps": _FIRST["num_inference_steps"],
}

_SWAP_SCHEDULERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DDIMScheduler": "ddim",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "kdpm2",
    "UniPCMultistepScheduler": "unipc",
    "DDPMScheduler": "ddpm",
    "LCMScheduler": "lcm",
    "LMSDiscreteScheduler": "lms",
}


def swap_kwargs(swap) -> dict:
    """generate() arguments for a manifest ``scheduler_swap`` ([class, overrides] or null)."""
    if not swap:
        return {}
    cls, overrides = swap
    overrides = dict(overrides or {})
    if cls == "DPMSolverMultistepScheduler":
        if overrides.pop("algorithm_type", "dpmsolver++").startswith("sde"):
            name = "dpmpp_2m_sde"
        else:
            name = "dpmpp_3m" if overrides.get("solver_order") == 3 else "dpmpp_2m"
        overrides.pop("solver_order", None)
    else:
        name = _SWAP_SCHEDULERS[cls]
    kwargs = {"scheduler": name}
    mapping = {"use_karras_sigmas": "karras", "timestep_spacing": "timestep_spacing",
               "prediction_type": "prediction_type"}  # fmt: skip
    for key, value in overrides.items():
        kwargs[mapping[key]] = value  # KeyError: an override the C API cannot express
    return kwargs


@pytest.mark.parametrize("case", manifest()["t2i"], ids=lambda c: c["case"])
def test_t2i_matches_the_diffusers_golden(base_model, case):
    golden = read_safetensors(fixtures_root() / "goldens" / "pipeline_t2i.safetensors")
    expected = golden[f"{case['case']}.image_uint8"].astype(np.int16)
    kwargs = dict(case["kwargs"])
    prompt = kwargs.pop("prompt")
    image = base_model.generate(
        prompt, seed=case["latents_seed"], **kwargs, **swap_kwargs(case.get("scheduler_swap"))
    )
    assert (image[..., 3] == 255).all()
    rgb = image[..., :3].astype(np.int16)
    assert rgb.shape == expected.shape
    worst = int(np.abs(rgb - expected).max())
    print(f"{case['case']}: worst |ours - golden| = {worst} (of 255), shape {rgb.shape}")
    assert worst <= 1


def test_progress_callback_returning_true_cancels(base_model):
    steps = []

    def progress(stage, step, total, seconds):
        steps.append((stage, step, total))
        return step >= 2

    with pytest.raises(sdxl.Cancelled) as err:
        base_model.generate("a fox", progress=progress, **SMALL)
    assert err.value.status == sdxl.Status.CANCELLED
    assert steps == [(sdxl.Stage.BASE, 1, SMALL["num_inference_steps"]),
                     (sdxl.Stage.BASE, 2, SMALL["num_inference_steps"])]  # fmt: skip


def test_cancel_token_from_another_thread(base_model):
    first_step, cancelled = threading.Event(), threading.Event()
    steps = []

    def progress(stage, step, total, seconds):
        steps.append(step)
        if step == 1:
            first_step.set()
            assert cancelled.wait(30)
        return False

    with sdxl.CancelToken() as token:

        def canceller():
            first_step.wait(30)
            token.cancel()
            cancelled.set()

        thread = threading.Thread(target=canceller)
        thread.start()
        with pytest.raises(sdxl.Cancelled):
            base_model.generate("a fox", cancel=token, progress=progress, **SMALL)
        thread.join()
    assert steps == [1]


def test_job_cancel_while_running(base_model):
    first_step, cancelled = threading.Event(), threading.Event()

    def progress(stage, step, total, seconds):  # runs on the job's worker thread
        if step == 1:
            first_step.set()
            cancelled.wait(30)
        return False

    with base_model.start("a fox", progress=progress, **SMALL) as job:
        assert first_step.wait(30)
        job.cancel()
        cancelled.set()
        with pytest.raises(sdxl.Cancelled):
            job.wait()
        state = job.poll()
        assert state.done and state.status == sdxl.Status.CANCELLED and state.step == 1
        with pytest.raises(sdxl.Cancelled):
            job.result()


def test_job_gives_the_blocking_result(base_model):
    previews = []
    expected, latents = base_model.generate("a fox", seed=7, return_latents=True, **SMALL)
    with base_model.start(
        "a fox", seed=7, preview=lambda *a: previews.append(a[3].shape), **SMALL
    ) as job:
        image = job.result(timeout=120)
        state = job.poll()
        job_latents = job.latents()
    assert state.done and state.status == sdxl.Status.OK
    assert state.step == state.total == SMALL["num_inference_steps"]
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(job_latents, latents)
    h, w = SMALL["height"] // 8, SMALL["width"] // 8
    assert latents.shape[0] == 1 and latents.shape[2:] == (h, w)
    assert previews == [(h, w, 3)] * SMALL["num_inference_steps"]


def test_output_is_written_into_the_callers_array(base_model):
    n = 2
    out = np.zeros((n, SMALL["height"], SMALL["width"], 4), dtype=np.uint8)
    result = base_model.generate("a fox", num_images_per_prompt=n, out=out, **SMALL)
    assert result is out
    assert (out[..., 3] == 255).all() and out[..., :3].std() > 0
    with pytest.raises(ValueError):
        base_model.generate("a fox", out=out[:1], num_images_per_prompt=n, **SMALL)


def test_img2img_reads_a_strided_array_in_place(base_model):
    rng = np.random.default_rng(0)
    h, w = SMALL["height"], SMALL["width"]
    canvas = rng.integers(0, 256, size=(h + 4, w + 8, 3), dtype=np.uint8)
    view = canvas[2 : 2 + h, 3 : 3 + w]  # rows are (w + 8) * 3 bytes apart
    assert not view.flags.c_contiguous
    kwargs = dict(strength=0.6, seed=3, num_inference_steps=SMALL["num_inference_steps"])
    strided = base_model.generate("a fox", image=view, **kwargs)
    packed = base_model.generate("a fox", image=np.ascontiguousarray(view), **kwargs)
    rgba = np.concatenate([view, np.full((h, w, 1), 255, np.uint8)], axis=2)
    from_rgba = base_model.generate("a fox", image=rgba, **kwargs)
    assert strided.shape == (1, h, w, 4)
    np.testing.assert_array_equal(strided, packed)
    np.testing.assert_array_equal(strided, from_rgba)


def test_errors_carry_status_and_message(base_model, tmp_path):
    with pytest.raises(sdxl.SdxlError) as err:
        base_model.generate("a fox", width=SMALL["width"] + 1, height=SMALL["height"])
    assert err.value.status == sdxl.Status.INVALID_ARGUMENT
    assert "width" in err.value.message
    with pytest.raises(sdxl.SdxlError) as err:
        sdxl.Model.load(tmp_path / "missing")
    assert err.value.status == sdxl.Status.IO and err.value.message
    with pytest.raises(sdxl.SdxlError) as err:
        base_model.generate("a fox", refiner=base_model, **SMALL)
    assert err.value.status == sdxl.Status.INVALID_ARGUMENT
    with pytest.raises(TypeError):
        base_model.generate("a fox", not_an_argument=1)
    with pytest.raises(ValueError):
        base_model.generate("a fox", scheduler="no_such_scheduler")


def test_callback_exception_reaches_the_caller(base_model):
    def progress(stage, step, total, seconds):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        base_model.generate("a fox", progress=progress, **SMALL)


def test_log_callback_receives_messages():
    messages = []
    sdxl.set_log_callback(lambda level, text: messages.append((level, text)), "info")
    try:
        with sdxl.Model.load(model_dir("StableDiffusionXLPipeline")) as model:
            assert model.kind == sdxl.ModelKind.BASE
    finally:
        sdxl.set_log_callback(None)
    assert messages and all(level >= sdxl.LogLevel.INFO for level, _ in messages)


def test_handles_close_and_refuse_use(base_model):
    token = sdxl.CancelToken()
    token.close()
    token.close()
    with pytest.raises(ValueError, match="closed"):
        token.cancel()
    assert sdxl.version().startswith("sdxl ")


def test_pil_images_when_pillow_is_present(base_model):
    try:
        from PIL import Image
    except ImportError:
        # Without Pillow the numpy path is the whole API; to_pil must say what is missing.
        with pytest.raises(ImportError):
            sdxl.to_pil(np.zeros((1, 8, 8, 4), np.uint8))
        return
    image = base_model.generate("a fox", seed=1, **SMALL)
    (pil_image,) = sdxl.to_pil(image)
    assert pil_image.size == (SMALL["width"], SMALL["height"])
    again = base_model.generate("a fox", seed=1, image=pil_image, strength=0.5,
                                num_inference_steps=SMALL["num_inference_steps"])  # fmt: skip
    assert again.shape == image.shape
    assert isinstance(pil_image, Image.Image)
