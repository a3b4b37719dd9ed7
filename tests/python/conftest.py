"""Fixtures of the Python tests (the helpers they share are in helpers.py)."""

from __future__ import annotations

import pytest

from helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
