"""The AMX guard: CPU weight repacking stays off where llama.cpp's AMX kernels would crash."""

from __future__ import annotations

import pytest

from server.engine.llama import native


@pytest.mark.parametrize(("setting", "has_amx", "expected"), [
    ("auto", True, False), ("auto", False, True), ("on", True, True), ("off", False, False)])
def test_repack_setting(monkeypatch: pytest.MonkeyPatch, setting: str, has_amx: bool,
                        expected: bool) -> None:
    monkeypatch.setattr(native, "build_has_amx", lambda: has_amx)
    assert native.repack_enabled(setting) is expected


def test_amx_detection_reads_the_build() -> None:
    native.init_backend()
    assert native.build_has_amx() == ("AMX_INT8 = 1" in native.system_info())
    assert "CPU" in native.system_info()
