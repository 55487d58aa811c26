"""The raw C interface of ``libsdxl`` (``include/sdxl.h``) through ctypes.

Everything here mirrors the header one to one: the structs, the callback types, the constants
and every function with its ``argtypes``/``restype``. :func:`lib` finds and loads the library
once, declares the functions and refuses a library whose ``sdxl_abi_version()`` differs from
:data:`ABI_VERSION`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

#: ``SDXL_ABI_VERSION`` of the header these declarations mirror.
ABI_VERSION = 1

#: Environment variable naming the library file to load (it wins over every other place).
LIBRARY_ENV = "SDXL_LIBRARY"

sdxl_status = c_int32


class sdxl_model(Structure):
    """Opaque model handle."""


class sdxl_cancel_token(Structure):
    """Opaque cancel token handle."""


class sdxl_job(Structure):
    """Opaque job handle."""


sdxl_log_fn = CFUNCTYPE(None, c_int32, c_char_p, c_void_p)
sdxl_progress_fn = CFUNCTYPE(c_int32, c_int32, c_uint32, c_uint32, c_double, c_void_p)
sdxl_preview_fn = CFUNCTYPE(
    None, c_int32, c_uint32, c_uint32, POINTER(c_uint8), c_uint32, c_uint32, c_void_p
)


class sdxl_load_options(Structure):
    """``struct sdxl_load_options``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("device", c_int32),
        ("device_index", c_uint32),
        ("dtype", c_int32),
        ("vae_dtype", c_int32),
        ("variant", c_char_p),
    ]


class sdxl_generate_params(Structure):
    """``struct sdxl_generate_params``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("width", c_uint32),
        ("height", c_uint32),
        ("steps", c_uint32),
        ("num_images", c_uint32),
        ("scheduler", c_int32),
        ("karras", c_int32),
        ("timestep_spacing", c_int32),
        ("prediction_type", c_int32),
        ("original_width", c_uint32),
        ("original_height", c_uint32),
        ("crop_top", c_uint32),
        ("crop_left", c_uint32),
        ("target_width", c_uint32),
        ("target_height", c_uint32),
        ("negative_original_width", c_uint32),
        ("negative_original_height", c_uint32),
        ("negative_crop_top", c_uint32),
        ("negative_crop_left", c_uint32),
        ("negative_target_width", c_uint32),
        ("negative_target_height", c_uint32),
        ("init_image_format", c_int32),
        ("init_image_stride", c_uint32),
        ("seed", c_uint64),
        ("guidance_scale", c_double),
        ("guidance_rescale", c_double),
        ("strength", c_double),
        ("refiner_start", c_double),
        ("aesthetic_score", c_double),
        ("negative_aesthetic_score", c_double),
        ("prompt", c_char_p),
        ("prompt_2", c_char_p),
        ("negative_prompt", c_char_p),
        ("negative_prompt_2", c_char_p),
        ("init_image", POINTER(c_uint8)),
        ("init_image_len", c_size_t),
        ("refiner", POINTER(sdxl_model)),
        ("cancel", POINTER(sdxl_cancel_token)),
        ("progress", sdxl_progress_fn),
        ("progress_user_data", c_void_p),
        ("preview", sdxl_preview_fn),
        ("preview_user_data", c_void_p),
    ]


class sdxl_job_progress(Structure):
    """``struct sdxl_job_progress``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("stage", c_int32),
        ("step", c_uint32),
        ("total", c_uint32),
        ("status", sdxl_status),
        ("done", c_uint8),
        ("elapsed_seconds", c_double),
    ]


#: Every public struct of the header, by its C name (the layout test compares them with C).
STRUCTS = {
    "sdxl_load_options": sdxl_load_options,
    "sdxl_generate_params": sdxl_generate_params,
    "sdxl_job_progress": sdxl_job_progress,
}

_P = POINTER
#: name -> (restype, argtypes) of every function of the header.
FUNCTIONS = {
    "sdxl_abi_version": (c_uint32, []),
    "sdxl_version": (c_char_p, []),
    "sdxl_status_str": (c_char_p, [sdxl_status]),
    "sdxl_last_error_message": (c_size_t, [_P(c_char), c_size_t]),
    "sdxl_set_log_callback": (sdxl_status, [sdxl_log_fn, c_void_p, c_int32]),
    "sdxl_load_options_init": (sdxl_status, [_P(sdxl_load_options)]),
    "sdxl_model_load": (
        sdxl_status,
        [c_char_p, _P(sdxl_load_options), _P(_P(sdxl_model))],
    ),
    "sdxl_model_kind": (sdxl_status, [_P(sdxl_model), _P(c_int32)]),
    "sdxl_model_free": (None, [_P(sdxl_model)]),
    "sdxl_cancel_token_new": (sdxl_status, [_P(_P(sdxl_cancel_token))]),
    "sdxl_cancel_token_cancel": (sdxl_status, [_P(sdxl_cancel_token)]),
    "sdxl_cancel_token_free": (None, [_P(sdxl_cancel_token)]),
    "sdxl_generate_params_init": (sdxl_status, [_P(sdxl_generate_params)]),
    "sdxl_generate_image_size": (sdxl_status, [_P(sdxl_generate_params), _P(c_size_t)]),
    "sdxl_generate_latents_size": (
        sdxl_status,
        [_P(sdxl_model), _P(sdxl_generate_params), _P(c_size_t)],
    ),
    "sdxl_generate": (
        sdxl_status,
        [
            _P(sdxl_model),
            _P(sdxl_generate_params),
            _P(c_uint8),
            c_size_t,
            _P(c_float),
            c_size_t,
        ],
    ),
    "sdxl_job_start": (
        sdxl_status,
        [_P(sdxl_model), _P(sdxl_generate_params), _P(_P(sdxl_job))],
    ),
    "sdxl_job_poll": (sdxl_status, [_P(sdxl_job), _P(sdxl_job_progress)]),
    "sdxl_job_cancel": (sdxl_status, [_P(sdxl_job)]),
    "sdxl_job_wait": (sdxl_status, [_P(sdxl_job), c_int32]),
    "sdxl_job_take_image": (sdxl_status, [_P(sdxl_job), _P(c_uint8), c_size_t]),
    "sdxl_job_take_latents": (sdxl_status, [_P(sdxl_job), _P(c_float), c_size_t]),
    "sdxl_job_free": (None, [_P(sdxl_job)]),
}


def _library_names() -> list[str]:
    if sys.platform == "win32":
        return ["sdxl.dll"]
    if sys.platform == "darwin":
        return ["libsdxl.dylib"]
    return ["libsdxl.so"]


def candidates() -> list[str]:
    """Where the library is looked for, in order: ``$SDXL_LIBRARY``, next to this package,
    then the system's search path."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return [env]
    here = Path(__file__).resolve().parent
    found = [str(here / name) for name in _library_names() if (here / name).is_file()]
    system = ctypes.util.find_library("sdxl")
    found.append(system if system else _library_names()[0])
    return found


class LibraryError(ImportError):
    """The library could not be found or loaded, or its ABI version differs."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def declare(cdll: ctypes.CDLL) -> ctypes.CDLL:
    """Sets ``restype``/``argtypes`` of every function on ``cdll`` and returns it."""
    for name, (restype, argtypes) in FUNCTIONS.items():
        fn = getattr(cdll, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return cdll


def load(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads the library (``path``, else the first of :func:`candidates` that loads), declares
    its functions and checks its ABI version. Later calls of :func:`lib` return it."""
    global _lib
    with _lock:
        paths = [os.fspath(path)] if path is not None else candidates()
        errors = []
        for p in paths:
            try:
                cdll = ctypes.CDLL(p)
                break
            except OSError as e:
                errors.append(f"{p}: {e}")
        else:
            raise LibraryError(
                "cannot load libsdxl (set $%s to its path): %s" % (LIBRARY_ENV, "; ".join(errors))
            )
        try:
            declare(cdll)
        except AttributeError as e:
            raise LibraryError(f"{p} is not libsdxl: {e}") from None
        version = cdll.sdxl_abi_version()
        if version != ABI_VERSION:
            raise LibraryError(
                f"{p} has ABI version {version}, this package needs {ABI_VERSION}"
            )
        _lib = cdll
        return cdll


def lib() -> ctypes.CDLL:
    """The loaded library, loading it on first use."""
    return _lib if _lib is not None else load()


# --- constants (``#define``s of the header) --------------------------------------------------

SDXL_DEFAULT = -1
SDXL_DTYPE_AUTO = -1
SDXL_PIXEL_RGBA8 = 0
SDXL_PIXEL_RGB8 = 1
SDXL_STATUS_OK = 0
SDXL_STATUS_TIMEOUT = 12
