"""The plugin is C: no C++ symbols are defined in its shared libraries, and
libfactorch_torch reaches torch only through the C shim."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from factorch import _lib

LIBS = sorted(p for p in _lib.LIB_DIR.glob("libfactorch*.so"))


def defined_symbols(path):
    out = subprocess.run(
        ["nm", "--defined-only", "--extern-only", "-D", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
@pytest.mark.parametrize("lib", LIBS, ids=lambda p: p.name)
def test_no_cxx_symbols_defined(lib):
    mangled = [s for s in defined_symbols(lib) if s.startswith("_Z")]
    assert not mangled, f"{lib.name} defines C++ symbols: {mangled[:10]}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_exported_c_api_uses_one_prefix():
    core = next(p for p in LIBS if p.name == "libfactorch.so")
    exported = [s for s in defined_symbols(core) if not s.startswith("_")]
    assert exported and all(s.startswith("fct_") for s in exported), exported


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_torch_glue_uses_only_the_c_shim():
    glue = next(p for p in LIBS if p.name == "libfactorch_torch.so")
    out = subprocess.run(["nm", "-D", "--undefined-only", str(glue)], check=True,
                         capture_output=True, text=True).stdout
    undefined = [line.split()[-1] for line in out.splitlines() if line.strip()]
    torch_syms = [s for s in undefined if "torch" in s or s.startswith("_Z")]
    # aoti_torch_*: the AOTI shim; torch_*: the stable C shim (torch >= 2.10).
    assert all(s.startswith(("aoti_torch_", "torch_")) for s in torch_syms), torch_syms
