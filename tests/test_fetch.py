"""Pinned fetching (tools/fetch.py): Debian packages are fetched for the architecture their pin names, on any
host — so the ONNX Runtime headers (architecture-independent) come from the same amd64 package on an arm64
Raspberry Pi or build host as here."""

from __future__ import annotations

import filecmp

import pytest

from mobiquant.tools import fetch

ORT_HEADERS_ARM64 = fetch.Pinned("deb", "libonnxruntime-dev", "1.21.0+dfsg-1",
                                 "libonnxruntime-dev_1.21.0+dfsg-1_arm64.deb",
                                 "d4b1967893865756c0fa8536be165259a8eb0e9068e60d322ba707ef4527e44e", suite="trixie")


@pytest.mark.parametrize("name,arch", [("libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb", "amd64"),
                                       ("python3.11-minimal_3.11.2-6_arm64.deb", "arm64"),
                                       ("tzdata_2024a-0+deb12u1_all.deb", "all")])
def test_the_pin_names_the_architecture(name, arch):
    assert fetch.deb_architecture(name) == arch


def test_a_pin_without_an_architecture_is_refused():
    with pytest.raises(fetch.FetchError, match="_<arch>.deb expected"):
        fetch.deb_architecture("libonnxruntime-dev.tar.gz")


@pytest.mark.slow
def test_foreign_architecture_packages_fetch_here_and_the_headers_are_the_same(tmp_path):
    """An arm64 package fetched on this amd64 host (the mechanism an arm64 host uses for the amd64 pin), and the
    ONNX Runtime headers it holds are byte for byte the amd64 package's."""
    arm64 = fetch.deb_members(fetch.fetch(ORT_HEADERS_ARM64), "usr/include/onnxruntime", tmp_path)
    amd64 = fetch.ort_headers()
    theirs = arm64 / "usr" / "include" / "onnxruntime"
    ours = sorted(str(p.relative_to(amd64)) for p in amd64.rglob("*") if p.is_file())
    assert "onnxruntime_c_api.h" in ours
    assert ours == sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(amd64, theirs, ours, shallow=False)
    assert not mismatch and not errors and len(match) == len(ours)
