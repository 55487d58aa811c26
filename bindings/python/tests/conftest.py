"""Shared fixtures of the binding tests: the library, the fixture models and goldens, and the
struct layout printed by the C program ``tests/c/layout.c``.

The library is ``$SDXL_LIBRARY``, else the repository's ``target/release`` or ``target/debug``
build; the fixtures are ``$SDXL_FIXTURES``, else ``../shared/reference/fixtures`` beside the
repository. Model folders are discovered by their ``model_index.json`` ``_class_name``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bindings" / "python"))

if not os.environ.get("SDXL_LIBRARY"):
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "libsdxl.so"
        if candidate.is_file():
            os.environ["SDXL_LIBRARY"] = str(candidate)
            break

import sdxl  # noqa: E402


def fixtures_root() -> Path:
    env = os.environ.get("SDXL_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "reference" / "fixtures"


def manifest() -> dict:
    return json.loads((fixtures_root() / "manifest.json").read_text())


def model_dir(class_name: str) -> Path:
    for d in sorted(fixtures_root().iterdir()):
        index = d / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == class_name:
            return d
    raise FileNotFoundError(f"no model folder with _class_name {class_name} in {fixtures_root()}")


_DTYPES = {"U8": np.uint8, "F32": np.float32, "F16": np.float16, "I64": np.int64, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file: 8-byte little-endian header length, JSON, data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(
            info["shape"]
        )
    return out


@pytest.fixture(scope="session")
def base_model():
    with sdxl.Model.load(model_dir("StableDiffusionXLPipeline")) as model:
        yield model


@pytest.fixture(scope="session")
def c_layout(tmp_path_factory) -> dict:
    """The JSON that ``tests/c/layout.c`` prints, compiled with ``$CC`` (default ``cc``)."""
    exe = tmp_path_factory.mktemp("layout") / "layout"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(REPO / "include"),
         str(REPO / "tests" / "c" / "layout.c"), "-o", str(exe)],
        check=True,
    )  # fmt: skip
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True).stdout)
