"""Packaging facts: the licence file, the supported transformers range declared once and honoured by pyproject."""
import pathlib
import tomllib

import pytest

from cpoc_kernels.integrations.hf.continuous.engine import SUPPORTED_TRANSFORMERS, transformers_supported

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_license_file_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and "LICENSE" in meta["license-files"]


@pytest.mark.parametrize("version, ok", [("5.19.9", False), ("5.20.0", True), ("5.22.1", True), ("5.24.0", True),
                                         ("5.24.3.dev0", True), ("5.25.0", False), ("6.0.0", False), ("4.57.1", False),
                                         ("garbage", False)])
def test_supported_transformers_range(version, ok):
    assert transformers_supported(version) is ok


def test_pyproject_caps_transformers_to_the_supported_range():
    from packaging.requirements import Requirement

    hf = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    (spec,) = [Requirement(r).specifier for r in hf if Requirement(r).name == "transformers"]
    for version in ("5.19.0", "5.20.0", "5.24.7", "5.25.0", "6.1.0"):
        assert spec.contains(version) is transformers_supported(version), (version, str(spec), SUPPORTED_TRANSFORMERS)
