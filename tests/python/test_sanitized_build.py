"""Under `make test-py-asan` (FACTORCH_EXPECT_ASAN=1): the libraries loaded are
the AddressSanitizer builds from FACTORCH_LIB_DIR, not the editable install's,
so the rest of the suite really runs the sanitized C code."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from factorch import _lib

pytestmark = pytest.mark.skipif(os.environ.get("FACTORCH_EXPECT_ASAN") != "1",
                                reason="only under make test-py-asan")


def mapped_paths():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "/" in line}


def test_libraries_come_from_factorch_lib_dir():
    want = Path(os.environ["FACTORCH_LIB_DIR"]).resolve()
    assert _lib.LIB_DIR.resolve() == want
    loaded = {Path(p).resolve() for p in mapped_paths() if Path(p).name.startswith("libfactorch")}
    assert {want / "libfactorch.so", want / "libfactorch_torch.so"} <= loaded, loaded
    assert all(p.parent == want for p in loaded), loaded


@pytest.mark.parametrize("name", ["libfactorch.so", "libfactorch_torch.so"])
def test_loaded_libraries_are_instrumented(name):
    # An ASan build calls __asan_report_* on a bad access; dlsym through the
    # library's handle finds it only when the library links the runtime.
    lib = ctypes.CDLL(str(_lib.LIB_DIR / name))
    assert hasattr(lib, "__asan_report_load8"), f"{name} is not built with ASan"
    assert any("libasan" in Path(p).name for p in mapped_paths())
