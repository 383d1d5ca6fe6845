"""Every script in examples/ runs from any working directory: its --help, started from an empty temporary folder
with no PYTHONPATH, prints its usage (a script that leans on the working directory to find the project's modules
fails here with ModuleNotFoundError)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_help_runs_from_any_directory(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: {script.name}"), r.stdout[:200]
