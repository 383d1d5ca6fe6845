"""pyproject.toml: `pip install -e .` makes the clone's flat modules importable from any folder.

Every module at the root is either installed (pyproject's py-modules) or named in NOT_INSTALLED with the reason, so a
new module cannot be forgotten; and an editable install, made in a fresh virtual environment, imports the clone's
amused.py even from the parent of a folder named amused/ (which shadows a module found through an import hook).
"""
import subprocess
import sys
import sysconfig
import tomllib

from conftest import ROOT

NOT_INSTALLED = {
    "bench": "the benchmark table of this clone (bench/RESULTS.md), run from the clone",
}


def py_modules() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]


def test_every_module_at_the_root_is_installed_or_said_not_to_be():
    at_root = {p.stem for p in ROOT.glob("*.py")}
    listed = py_modules()
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert not set(listed) & set(NOT_INSTALLED)
    assert sorted(at_root - set(NOT_INSTALLED) - set(listed)) == [], "modules at the root that pip would not install"
    assert sorted(set(listed) - at_root) == [], "pyproject.toml lists modules that are not at the root"


def test_dependencies_are_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}


def test_an_editable_install_imports_the_clone_from_the_parent_of_a_folder_named_amused(tmp_path):
    """pip install -e into a prefix of its own (offline: --no-build-isolation, with this environment's setuptools),
    from a copy of the files it reads, so that the clone itself gets no amused.egg-info. Then a Python that sees
    only that prefix's site-packages (-S, then site.addsitedir: its .pth files run) and, first on its path, the
    current folder, as `python -c` does: the parent of amused/. It asks where `amused` would be imported from,
    without running it (that prefix has no torch)."""
    clone = tmp_path / "amused"  # the name that shadowed the module
    clone.mkdir()
    for name in ["pyproject.toml", "requirements.txt", "README.md", *(f"{m}.py" for m in py_modules())]:
        (clone / name).write_bytes((ROOT / name).read_bytes())
    prefix = tmp_path / "prefix"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--prefix", str(prefix), "-e", str(clone)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    site_packages = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    where = subprocess.run([sys.executable, "-S", "-c", f"import importlib.util, site; site.addsitedir("
                            f"{site_packages!r}); print(importlib.util.find_spec('amused').origin)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(clone / "amused.py"), "the folder amused/ shadowed the module"
