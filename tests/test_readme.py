"""The README's examples must run as written: the usage example, and every
block marked ``<!-- runs in tests/test_readme.py -->`` (each asserts its own
results, e.g. equality with the code it replaces)."""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- runs in tests/test_readme.py -->"


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["x"].grad is not None and namespace["W"].grad is not None
    assert namespace["loss"].isfinite()


MARKED = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", _readme(), flags=re.S)


@pytest.mark.parametrize("block", MARKED, ids=[f"block{i}" for i in range(len(MARKED))])
def test_readme_marked_example_runs(block):
    torch.manual_seed(0)
    exec(compile(block, "README.md", "exec"), {})


def test_readme_marks_examples():
    assert len(MARKED) == 5
