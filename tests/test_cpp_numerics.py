"""Compiles and runs the C++ unit tests of the shared numerics header."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_numerics_header(tmp_path):
    binary = tmp_path / "test_numerics"
    subprocess.run(
        ["g++", "-std=c++20", "-O2", "-I", os.path.join(ROOT, "csrc", "include"), "-I", os.path.join(ROOT, "csrc"),
         os.path.join(ROOT, "tests", "cpp", "test_numerics.cpp"), "-o", str(binary)],
        check=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
