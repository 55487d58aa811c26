"""The ctypes declarations agree with ``include/sdxl.h`` and the C compiler's layout."""

from __future__ import annotations

import ctypes
import re

import pytest
import sdxl
from sdxl import _ffi

from conftest import REPO

HEADER = (REPO / "include" / "sdxl.h").read_text()


def test_struct_layout_matches_c(c_layout):
    assert c_layout["abi_version"] == sdxl.ABI_VERSION
    assert set(c_layout["structs"]) == set(_ffi.STRUCTS)
    for name, c in c_layout["structs"].items():
        py = _ffi.STRUCTS[name]
        assert ctypes.sizeof(py) == c["size"], f"{name} size"
        assert ctypes.alignment(py) == c["align"], f"{name} align"
        assert [f[0] for f in py._fields_] == list(c["fields"]), f"{name} field order"
        for field, offset in c["fields"].items():
            assert getattr(py, field).offset == offset, f"{name}.{field} offset"
        print(f"{name}: size {c['size']}, align {c['align']}, {len(c['fields'])} fields agree")


def test_every_header_function_is_declared():
    declared = set(re.findall(r"^[a-z_][\w \*]*?\b(sdxl_\w+)\(", HEADER, re.MULTILINE))
    assert declared == set(_ffi.FUNCTIONS)
    lib = _ffi.lib()
    for name in declared:
        assert getattr(lib, name).argtypes is not None or _ffi.FUNCTIONS[name][1] == []


@pytest.mark.parametrize(
    "prefix,enum",
    [
        ("SDXL_STATUS_", sdxl.Status),
        ("SDXL_LOG_", sdxl.LogLevel),
        ("SDXL_DEVICE_", sdxl.Device),
        ("SDXL_DTYPE_", sdxl.DType),
        ("SDXL_MODEL_", sdxl.ModelKind),
        ("SDXL_SCHEDULER_", sdxl.Scheduler),
        ("SDXL_SPACING_", sdxl.Spacing),
        ("SDXL_PREDICTION_", sdxl.Prediction),
        ("SDXL_STAGE_", sdxl.Stage),
    ],
)
def test_constants_match_header(prefix, enum):
    defines = {
        name: int(value)
        for name, value in re.findall(rf"#define {prefix}(\w+) (-?\d+)", HEADER)
    }
    ours = {m.name: int(m) for m in enum if m.name != "DEFAULT"}
    assert ours == defines


def test_abi_version_is_checked_at_load(monkeypatch):
    header = int(re.search(r"#define SDXL_ABI_VERSION (\d+)", HEADER).group(1))
    assert sdxl.ABI_VERSION == header == _ffi.lib().sdxl_abi_version()
    monkeypatch.setattr(_ffi, "ABI_VERSION", header + 1)
    monkeypatch.setattr(_ffi, "_lib", None)
    with pytest.raises(sdxl.LibraryError, match="ABI version"):
        _ffi.load()


def test_missing_library_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(_ffi, "_lib", None)
    with pytest.raises(sdxl.LibraryError, match="SDXL_LIBRARY"):
        _ffi.load(tmp_path / "libnothing.so")


def test_library_search_order(monkeypatch, tmp_path):
    package = tmp_path / "sdxl"
    package.mkdir()
    name = _ffi._library_names()[0]
    (package / name).symlink_to(_ffi.lib()._name)
    monkeypatch.setattr(_ffi, "__file__", str(package / "_ffi.py"))
    monkeypatch.setenv(_ffi.LIBRARY_ENV, "/explicit/libsdxl.so")
    assert _ffi.candidates() == ["/explicit/libsdxl.so"]
    monkeypatch.delenv(_ffi.LIBRARY_ENV)
    found = _ffi.candidates()
    assert found[0] == str(package / name)  # next to the package first
    assert len(found) == 2  # then the system's loader
    monkeypatch.setattr(_ffi, "_lib", None)
    assert _ffi.load(found[0]).sdxl_abi_version() == sdxl.ABI_VERSION
