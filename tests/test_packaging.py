"""The Python package as PyPA's tools see it: `python -m build` makes an sdist and a wheel, `twine check`
passes, and the wheel installs into a fresh virtual environment where `relay --version` runs.

The fresh venv has no pip of its own (faster); this venv's pip installs into it (`pip --python`), its
dependencies coming from the package index the machine's pip is set up for.
"""

from __future__ import annotations

import email.parser
import functools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(300)


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this venv (pip install -e '.[dev]')")
    return str(path)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel built by `python -m build` from a copy of the tree (the build leaves no egg-info
    or build/ folder in the working tree, and sees only what git would ship plus the working files)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "relay-sidecar"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "bench", "build", "dist"
        ),
    )
    # The copy has no .git: the version comes in as the Docker build gets it (scripts/image-version).
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": _version()},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@functools.cache
def _version() -> str:
    """The version from git tags (setuptools-scm), as scripts/image-version prints it."""
    script = REPO / "scripts" / "image-version"
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return out.stdout.strip()


def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    version = _version()
    names = sorted(p.name for p in dist.iterdir())
    assert names == [f"relay_sidecar-{version}-py3-none-any.whl", f"relay_sidecar-{version}.tar.gz"]
    result = subprocess.run(
        [_tool("twine"), "check", "--strict", *(str(p) for p in sorted(dist.iterdir()))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_metadata_has_readme_classifiers_urls_licence_and_entry_point(dist: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        licence = z.read(f"{info}/licenses/LICENSE").decode()
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "# relay-sidecar" in (meta.get_payload() or ""), "the README is the long description"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert licence == (REPO / "LICENSE").read_text()
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    assert any(c.startswith("Topic :: ") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues"} <= urls.keys(), urls
    assert "relay = relay.cli:main" in entry_points


def test_wheel_installs_into_a_fresh_venv_and_relay_runs(dist: Path, tmp_path: Path) -> None:
    """Steps: a venv without pip; this venv's pip installs relay-sidecar into it from the folder holding
    the wheel (`--find-links`, as the README says; dependencies from the index); its `relay --version`
    prints the project's version and `relay --help` exits 0."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--disable-pip-version-check", "--find-links", str(dist), f"relay-sidecar=={_version()}"],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    relay = venv / "bin" / "relay"
    version = subprocess.run([str(relay), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"relay-sidecar {_version()}"
    assert subprocess.run([str(relay), "--help"], capture_output=True, timeout=30).returncode == 0
    # The installed copy is the one that ran, not the working tree.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import relay; print(relay.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
