"""The suite's own machinery (tests/conftest.py): what it does to speed the run up must not keep
a test file's objects alive."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

FIRST_FILE = """
    import weakref

    import pytest

    import freed

    class Big:
        def __init__(self):
            self.me = self  # a reference cycle: only the garbage collector frees it
            self.data = bytearray(1 << 20)

    @pytest.fixture(scope="module")
    def module_held():
        big = Big()
        freed.REFS.append(weakref.ref(big))
        yield big

    @pytest.fixture()
    def test_held():
        big = Big()
        freed.REFS.append(weakref.ref(big))
        return big

    def test_holds(module_held, test_held):
        assert module_held.data and test_held.data
"""
SECOND_FILE = """
    import gc

    import freed

    def test_the_first_files_objects_were_freed():
        gc.collect()
        assert len(freed.REFS) == 2 and all(ref() is None for ref in freed.REFS)
"""


def child_environment(tmp_path) -> dict[str, str]:
    """The child is a plain pytest (-p no:xdist), not an xdist worker: without the worker's variable
    tests/conftest.py leaves torch unimported there, as in any single-process run (1.6 s of the
    child's 2.0 s of CPU, AMD EPYC avx512_bf16); the hooks under test import nothing of torch."""
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    environment.pop("PYTEST_XDIST_WORKER", None)
    return environment


def test_the_garbage_collection_hooks_free_a_finished_files_fixtures(tmp_path):
    """After a file, its objects in reference cycles are collected before the survivors are frozen
    (frozen, they would never be collected)."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection, pytest_runtest_protocol\n")
    (tmp_path / "freed.py").write_text("REFS = []\n")
    (tmp_path / "test_a.py").write_text(textwrap.dedent(FIRST_FILE))
    (tmp_path / "test_b.py").write_text(textwrap.dedent(SECOND_FILE))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "test_a.py", "test_b.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=child_environment(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "2 passed" in result.stdout
