"""Stable Diffusion XL through ``libsdxl``'s C interface (ctypes, no compiled extension).

>>> import sdxl
>>> with sdxl.Model.load("sdxl-base") as model:
...     images = model.generate("a red fox", width=1024, height=1024, seed=1)
>>> images.shape          # (num_images, height, width, 4), RGBA, uint8
(1, 1024, 1024, 4)

The library is found through ``$SDXL_LIBRARY``, next to this package, or on the system's
search path; a library of another ABI version is refused (:class:`LibraryError`). Failures
raise :class:`SdxlError` (``status``, ``message``); cancellation raises :class:`Cancelled`.
Images come back as numpy arrays written directly by the library (pass ``out=`` to reuse
one); an init image is read in place from a numpy array (rows may be strided) or a PIL image.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import byref, c_float, c_int32, c_size_t, c_uint8
from typing import Any, Callable, NamedTuple

import numpy as np

from . import _ffi
from ._ffi import ABI_VERSION, LibraryError, lib

__all__ = [
    "ABI_VERSION",
    "Cancelled",
    "CancelToken",
    "DType",
    "Device",
    "Job",
    "JobProgress",
    "LibraryError",
    "LogLevel",
    "Model",
    "ModelKind",
    "Prediction",
    "Scheduler",
    "SdxlError",
    "Spacing",
    "Stage",
    "Status",
    "load_library",
    "set_log_callback",
    "to_pil",
    "version",
]

load_library = _ffi.load


class Status(enum.IntEnum):
    """``SDXL_STATUS_*``."""

    OK = 0
    NULL_ARGUMENT = 1
    INVALID_ARGUMENT = 2
    IO = 3
    MODEL_FORMAT = 4
    UNSUPPORTED = 5
    DEVICE = 6
    CANCELLED = 7
    PANIC = 8
    ABI_MISMATCH = 9
    NON_FINITE = 10
    BUFFER_TOO_SMALL = 11
    TIMEOUT = 12
    POISONED = 13
    NOT_READY = 14


class LogLevel(enum.IntEnum):
    """``SDXL_LOG_*``."""

    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4


class Device(enum.IntEnum):
    """``SDXL_DEVICE_*``."""

    CPU = 0
    CUDA = 1
    METAL = 2


class DType(enum.IntEnum):
    """``SDXL_DTYPE_*``."""

    AUTO = -1
    F32 = 0
    F16 = 1
    BF16 = 2


class ModelKind(enum.IntEnum):
    """``SDXL_MODEL_*``."""

    BASE = 0
    REFINER = 1


class Scheduler(enum.IntEnum):
    """``SDXL_SCHEDULER_*``; ``DEFAULT`` is the model's own scheduler config."""

    DEFAULT = -1
    EULER = 0
    EULER_ANCESTRAL = 1
    DDIM = 2
    DPMPP_2M = 3
    DPMPP_3M = 4
    DPMPP_2M_SDE = 5
    HEUN = 6
    KDPM2 = 7
    UNIPC = 8
    DDPM = 9
    LCM = 10
    LMS = 11


class Spacing(enum.IntEnum):
    """``SDXL_SPACING_*`` (diffusers' ``timestep_spacing``)."""

    DEFAULT = -1
    LEADING = 0
    TRAILING = 1
    LINSPACE = 2


class Prediction(enum.IntEnum):
    """``SDXL_PREDICTION_*`` (diffusers' ``prediction_type``)."""

    DEFAULT = -1
    EPSILON = 0
    V_PREDICTION = 1
    SAMPLE = 2


class Stage(enum.IntEnum):
    """``SDXL_STAGE_*``: which part of a run a step belongs to."""

    BASE = 0
    REFINER = 1
    IMG2IMG = 2


def _enum(cls: type[enum.IntEnum], value: Any, what: str) -> int:
    """An enum member from itself, its int value or its (case-insensitive) name."""
    if value is None:
        return _ffi.SDXL_DEFAULT
    try:
        return int(cls[value.upper()] if isinstance(value, str) else cls(value))
    except (KeyError, ValueError):
        names = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"{what} {value!r}: expected one of {names}") from None


# --- errors ------------------------------------------------------------------------------------


class SdxlError(RuntimeError):
    """A call into libsdxl failed: ``status`` (a :class:`Status`) and the library's ``message``."""

    def __init__(self, status: int, message: str, call: str = ""):
        try:
            self.status: Status | int = Status(status)
        except ValueError:
            self.status = status
        self.message = message
        self.call = call
        name = getattr(self.status, "name", str(status))
        super().__init__(f"{call}: {name} ({status}): {message}" if call else message)


class Cancelled(SdxlError):
    """The run was cancelled (token, job cancel, or a progress callback that returned true)."""


def last_error_message() -> str:
    """The calling thread's last detailed error message (``sdxl_last_error_message``)."""
    size = lib().sdxl_last_error_message(None, 0)
    buf = ctypes.create_string_buffer(max(size, 1))
    lib().sdxl_last_error_message(buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def _check(status: int, call: str) -> None:
    if status != _ffi.SDXL_STATUS_OK:
        message = last_error_message() or status_str(status)
        cls = Cancelled if status == Status.CANCELLED else SdxlError
        raise cls(status, message, call)


def status_str(status: int) -> str:
    """The library's static description of a status code."""
    return lib().sdxl_status_str(status).decode()


def version() -> str:
    """The library's version string, e.g. ``"sdxl 0.1.0 (candle 0.11.1; features: cpu)"``."""
    return lib().sdxl_version().decode()


# --- logging -----------------------------------------------------------------------------------

_log_callback = None  # the ctypes thunk the library holds; kept alive here


def set_log_callback(
    callback: Callable[[LogLevel, str], None] | None, min_level: int | str = LogLevel.INFO
) -> None:
    """Installs the process-wide log callback (``None`` turns logging off).

    ``callback(level, message)`` may run on any thread, also library worker threads. Exceptions
    it raises are printed and dropped (they cannot cross the C boundary).
    """
    global _log_callback
    level = _enum(LogLevel, min_level, "log level")
    if callback is None:
        thunk = _ffi.sdxl_log_fn()
    else:

        def trampoline(lvl: int, message: bytes, _user: int) -> None:
            callback(LogLevel(lvl), message.decode("utf-8", "replace"))

        thunk = _ffi.sdxl_log_fn(trampoline)
    _check(lib().sdxl_set_log_callback(thunk, None, level), "sdxl_set_log_callback")
    # Only now is the previous callback guaranteed to be finished: release it.
    _log_callback = thunk if callback is not None else None


# --- handles -----------------------------------------------------------------------------------


class _Handle:
    """Owns one library handle, freed by :meth:`close`, ``with`` or garbage collection."""

    _free_name = ""

    def __init__(self, ptr: Any):
        self._ptr = ptr

    @property
    def handle(self) -> Any:
        """The raw library pointer; ``ValueError`` once closed."""
        if not self._ptr:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        """Frees the handle now (idempotent)."""
        ptr, self._ptr = self._ptr, None
        if ptr:
            getattr(lib(), self._free_name)(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class CancelToken(_Handle):
    """A flag that stops the runs it is passed to; :meth:`cancel` works from any thread."""

    _free_name = "sdxl_cancel_token_free"

    def __init__(self) -> None:
        ptr = ctypes.POINTER(_ffi.sdxl_cancel_token)()
        _check(lib().sdxl_cancel_token_new(byref(ptr)), "sdxl_cancel_token_new")
        super().__init__(ptr)

    def cancel(self) -> None:
        """Requests cancellation; runs using the token stop before their next step."""
        _check(lib().sdxl_cancel_token_cancel(self.handle), "sdxl_cancel_token_cancel")


class JobProgress(NamedTuple):
    """A snapshot of a :class:`Job` (``sdxl_job_progress``)."""

    stage: int
    step: int
    total: int
    status: Status
    done: bool
    elapsed_seconds: float


class _Callbacks:
    """The ctypes thunks of one run, kept alive while the library may call them; remembers the
    first exception a Python callback raised so that it can be re-raised to the caller."""

    def __init__(self, progress: Callable | None, preview: Callable | None):
        self.error: BaseException | None = None
        self.progress = _ffi.sdxl_progress_fn(self._progress(progress)) if progress else None
        self.preview = _ffi.sdxl_preview_fn(self._preview(preview)) if preview else None

    def _progress(self, fn: Callable) -> Callable:
        def trampoline(stage: int, step: int, total: int, elapsed: float, _user: int) -> int:
            try:
                return 1 if fn(Stage(stage), step, total, elapsed) else 0
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = self.error or e
                return 1

        return trampoline

    def _preview(self, fn: Callable) -> Callable:
        def trampoline(stage, step, total, rgb, width, height, _user) -> None:
            try:
                view = np.ctypeslib.as_array(rgb, shape=(height, width, 3))
                fn(Stage(stage), step, total, view.copy())
            except BaseException as e:  # noqa: BLE001
                self.error = self.error or e

        return trampoline

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def _pair(value: Any, what: str) -> tuple[int, int]:
    """A diffusers ``(height, width)`` / ``(top, left)`` pair."""
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair of integers, got {value!r}") from None


def _as_image_array(image: Any) -> np.ndarray:
    """A ``(height, width, 3|4)`` uint8 array viewing ``image`` (numpy array or PIL image)."""
    if not isinstance(image, np.ndarray):
        if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
            image = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
        image = np.asarray(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(
            f"init image must be uint8 (height, width, 3 or 4), got {image.dtype} {image.shape}"
        )
    channels = image.shape[2]
    # The library reads tightly packed pixels in rows any distance apart: keep such an array
    # in place, copy anything else.
    if image.strides[2] != 1 or image.strides[1] != channels or image.strides[0] < 0:
        image = np.ascontiguousarray(image)
    return image


class _Run:
    """A filled ``sdxl_generate_params`` plus everything its pointers point to."""

    _KEYS = {
        "prompt_2", "negative_prompt", "negative_prompt_2", "height", "width",
        "num_inference_steps", "num_images_per_prompt", "guidance_scale", "guidance_rescale",
        "strength", "aesthetic_score", "negative_aesthetic_score", "original_size",
        "crops_coords_top_left", "target_size", "negative_original_size",
        "negative_crops_coords_top_left", "negative_target_size", "image", "seed", "scheduler",
        "karras", "timestep_spacing", "prediction_type", "refiner", "refiner_start",
        "denoising_end", "cancel", "progress", "preview",
    }  # fmt: skip

    def __init__(self, model: Model, prompt: str, kwargs: dict[str, Any]):
        unknown = set(kwargs) - self._KEYS
        if unknown:
            raise TypeError(f"unexpected generate arguments: {', '.join(sorted(unknown))}")
        p = _ffi.sdxl_generate_params()
        _check(lib().sdxl_generate_params_init(byref(p)), "sdxl_generate_params_init")
        self.params = p
        self.keep: list[Any] = [model]  # what the params point to
        p.prompt = self._str(prompt)
        for key in ("prompt_2", "negative_prompt", "negative_prompt_2"):
            if kwargs.get(key) is not None:
                setattr(p, key, self._str(kwargs[key]))
        simple = {
            "height": "height",
            "width": "width",
            "num_inference_steps": "steps",
            "num_images_per_prompt": "num_images",
            "guidance_scale": "guidance_scale",
            "guidance_rescale": "guidance_rescale",
            "strength": "strength",
            "aesthetic_score": "aesthetic_score",
            "negative_aesthetic_score": "negative_aesthetic_score",
            "seed": "seed",
            "refiner_start": "refiner_start",
            "denoising_end": "refiner_start",
        }
        for key, field in simple.items():
            if kwargs.get(key) is not None:
                setattr(p, field, kwargs[key])
        pairs = {
            "original_size": ("original_height", "original_width"),
            "target_size": ("target_height", "target_width"),
            "negative_original_size": ("negative_original_height", "negative_original_width"),
            "negative_target_size": ("negative_target_height", "negative_target_width"),
            "crops_coords_top_left": ("crop_top", "crop_left"),
            "negative_crops_coords_top_left": ("negative_crop_top", "negative_crop_left"),
        }
        for key, (first, second) in pairs.items():
            if kwargs.get(key) is not None:
                a, b = _pair(kwargs[key], key)
                setattr(p, first, a)
                setattr(p, second, b)
        p.scheduler = _enum(Scheduler, kwargs.get("scheduler"), "scheduler")
        p.timestep_spacing = _enum(Spacing, kwargs.get("timestep_spacing"), "timestep_spacing")
        p.prediction_type = _enum(Prediction, kwargs.get("prediction_type"), "prediction_type")
        karras = kwargs.get("karras")
        p.karras = _ffi.SDXL_DEFAULT if karras is None else int(bool(karras))
        if kwargs.get("image") is not None:
            image = _as_image_array(kwargs["image"])
            self.keep.append(image)
            height, width, channels = image.shape
            if kwargs.get("height") is None and kwargs.get("width") is None:
                p.height, p.width = height, width
            p.init_image_format = _ffi.SDXL_PIXEL_RGBA8 if channels == 4 else _ffi.SDXL_PIXEL_RGB8
            p.init_image_stride = image.strides[0]
            p.init_image = image.ctypes.data_as(ctypes.POINTER(c_uint8))
            p.init_image_len = image.strides[0] * (height - 1) + width * channels
        if kwargs.get("refiner") is not None:
            self.keep.append(kwargs["refiner"])
            p.refiner = kwargs["refiner"].handle
        if kwargs.get("cancel") is not None:
            self.keep.append(kwargs["cancel"])
            p.cancel = kwargs["cancel"].handle
        self.callbacks = _Callbacks(kwargs.get("progress"), kwargs.get("preview"))
        if self.callbacks.progress:
            p.progress = self.callbacks.progress
        if self.callbacks.preview:
            p.preview = self.callbacks.preview
        self.model = model

    def _str(self, s: str) -> bytes:
        b = s.encode("utf-8")
        self.keep.append(b)
        return b

    @property
    def shape(self) -> tuple[int, int, int, int]:
        p = self.params
        return (p.num_images, p.height, p.width, 4)

    def image_buffer(self, out: np.ndarray | None) -> np.ndarray:
        """``out`` checked, or a new array, to receive the RGBA8 images."""
        size = c_size_t()
        _check(lib().sdxl_generate_image_size(byref(self.params), byref(size)),
               "sdxl_generate_image_size")  # fmt: skip
        if out is None:
            return np.empty(self.shape, dtype=np.uint8)
        if (
            not isinstance(out, np.ndarray)
            or out.dtype != np.uint8
            or out.nbytes < size.value
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(f"out must be a writable C-contiguous uint8 array of {size.value} bytes")
        return out

    def latents_buffer(self) -> np.ndarray:
        size = c_size_t()
        _check(lib().sdxl_generate_latents_size(self.model.handle, byref(self.params), byref(size)),
               "sdxl_generate_latents_size")  # fmt: skip
        n, h, w, _ = self.shape
        channels = size.value // (n * (h // 8) * (w // 8)) if size.value else 0
        if channels * n * (h // 8) * (w // 8) == size.value:
            return np.empty((n, channels, h // 8, w // 8), dtype=np.float32)
        return np.empty(size.value, dtype=np.float32)


def _u8(a: np.ndarray) -> Any:
    return a.ctypes.data_as(ctypes.POINTER(c_uint8))


def _f32(a: np.ndarray | None) -> Any:
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(c_float))


class Model(_Handle):
    """A loaded SDXL base or refiner. Read-only after loading: threads may share it."""

    _free_name = "sdxl_model_free"

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: int | str = Device.CPU,
        device_index: int = 0,
        dtype: int | str = DType.F32,
        vae_dtype: int | str = DType.AUTO,
        variant: str | None = None,
    ) -> Model:
        """Loads a diffusers folder (``sdxl_model_load``)."""
        o = _ffi.sdxl_load_options()
        _check(lib().sdxl_load_options_init(byref(o)), "sdxl_load_options_init")
        o.device = _enum(Device, device, "device")
        o.device_index = device_index
        o.dtype = _enum(DType, dtype, "dtype")
        o.vae_dtype = _enum(DType, vae_dtype, "vae_dtype")
        o.variant = variant.encode() if variant is not None else None
        ptr = ctypes.POINTER(_ffi.sdxl_model)()
        _check(lib().sdxl_model_load(str(path).encode(), byref(o), byref(ptr)), "sdxl_model_load")
        return cls(ptr)

    @property
    def kind(self) -> ModelKind:
        """Base or refiner."""
        kind = c_int32()
        _check(lib().sdxl_model_kind(self.handle, byref(kind)), "sdxl_model_kind")
        return ModelKind(kind.value)

    def generate(
        self,
        prompt: str,
        *,
        out: np.ndarray | None = None,
        return_latents: bool = False,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Generates images, blocking; returns RGBA8 ``(num_images, height, width, 4)``.

        Keyword arguments use diffusers' names (``negative_prompt``, ``height``, ``width``,
        ``num_inference_steps``, ``num_images_per_prompt``, ``guidance_scale``,
        ``guidance_rescale``, ``strength``, ``original_size``, ``crops_coords_top_left``,
        ``target_size``, ``negative_*``, ``aesthetic_score``, ``image`` for image-to-image)
        plus ``seed``, ``scheduler``, ``karras``, ``timestep_spacing``, ``prediction_type``,
        ``refiner`` and ``refiner_start`` (alias ``denoising_end``), ``cancel`` (a
        :class:`CancelToken`), ``progress(stage, step, total, seconds) -> stop?`` and
        ``preview(stage, step, total, rgb)``; both callbacks run on this thread.

        The library writes the images straight into ``out`` (or a new array). With
        ``return_latents`` the final latents ``(n, 4, h/8, w/8)`` float32 come too.
        """
        run = _Run(self, prompt, kwargs)
        image = run.image_buffer(out)
        latents = run.latents_buffer() if return_latents else None
        status = lib().sdxl_generate(
            self.handle,
            byref(run.params),
            _u8(image),
            image.nbytes,
            _f32(latents),
            0 if latents is None else latents.size,
        )
        run.callbacks.reraise()
        _check(status, "sdxl_generate")
        return (image, latents) if return_latents else image

    def start(self, prompt: str, **kwargs: Any) -> Job:
        """Starts the generation of :meth:`generate` on a library worker thread and returns
        its :class:`Job` at once. Callbacks run on the worker thread."""
        run = _Run(self, prompt, kwargs)
        ptr = ctypes.POINTER(_ffi.sdxl_job)()
        _check(lib().sdxl_job_start(self.handle, byref(run.params), byref(ptr)), "sdxl_job_start")
        return Job(ptr, run)


class Job(_Handle):
    """A generation running on a library worker thread. Closing it cancels and waits."""

    _free_name = "sdxl_job_free"

    def __init__(self, ptr: Any, run: _Run):
        super().__init__(ptr)
        self._run = run  # keeps the callbacks alive until the job is freed

    def poll(self) -> JobProgress:
        """Where the job stands, without blocking."""
        p = _ffi.sdxl_job_progress(struct_size=ctypes.sizeof(_ffi.sdxl_job_progress))
        _check(lib().sdxl_job_poll(self.handle, byref(p)), "sdxl_job_poll")
        return JobProgress(p.stage, p.step, p.total, Status(p.status), bool(p.done),
                           p.elapsed_seconds)  # fmt: skip

    def cancel(self) -> None:
        """Requests cancellation (any thread); the job stops before its next step."""
        _check(lib().sdxl_job_cancel(self.handle), "sdxl_job_cancel")

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the end (``None``: no limit); True once done, False on timeout. Raises the
        job's error (:class:`Cancelled` after a cancel) if it failed."""
        ms = -1 if timeout is None else max(0, min(int(timeout * 1000), 2**31 - 1))
        status = lib().sdxl_job_wait(self.handle, ms)
        if status == _ffi.SDXL_STATUS_TIMEOUT:
            return False
        self._run.callbacks.reraise()
        _check(status, "sdxl_job_wait")
        return True

    def result(self, out: np.ndarray | None = None, timeout: float | None = None) -> np.ndarray:
        """Waits, then copies the images into ``out`` (or a new array) and returns it."""
        if not self.wait(timeout):
            raise SdxlError(Status.TIMEOUT, "the job is still running", "Job.result")
        image = self._run.image_buffer(out)
        _check(lib().sdxl_job_take_image(self.handle, _u8(image), image.nbytes), "sdxl_job_take_image")
        return image

    def latents(self, timeout: float | None = None) -> np.ndarray:
        """Waits, then returns the final latents ``(n, 4, h/8, w/8)`` float32."""
        if not self.wait(timeout):
            raise SdxlError(Status.TIMEOUT, "the job is still running", "Job.latents")
        latents = self._run.latents_buffer()
        _check(lib().sdxl_job_take_latents(self.handle, _f32(latents), latents.size),
               "sdxl_job_take_latents")  # fmt: skip
        return latents


def to_pil(images: np.ndarray) -> list[Any]:
    """RGB PIL images from an RGBA8 result (needs Pillow)."""
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(img[..., :3]), "RGB") for img in images]

