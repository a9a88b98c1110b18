"""The project's non-Python files checked by their own ecosystems' tools: hadolint on the Dockerfile,
shellcheck on every shell script, kubernetes-validate (strict, offline schemas) on the Kubernetes
manifests against a release with native sidecars, plus what the manifest must keep.

Findings are fixed in the files or ignored inline with a reason next to the ignore; these tests run
the tools with no extra options, so an ignore can only live in the file it applies to.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.29.0"  # the first release with native sidecars on by default
MANIFESTS = sorted((REPO / "compose-examples" / "kubernetes").glob("*.yaml"))
SHEBANG = re.compile(rb"^#!\s*/\S*(?:/env\s+)?(?:ba|da)?sh\b")


def _venv_tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this venv (pip install -e '.[dev]')")
    return str(path)


def shell_scripts() -> list[Path]:
    """Every tracked file that is a shell script: a shell shebang, or a .sh name (sourced files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    found = []
    for name in filter(None, listed):
        path = REPO / name.decode()
        if not path.is_file():
            continue  # deleted in the working tree
        with path.open("rb") as f:
            first = f.readline()
        if path.suffix == ".sh" or SHEBANG.match(first):
            found.append(path)
    return sorted(found)


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [_venv_tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_every_shell_script() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip(
            "shellcheck is not installed (Debian package shellcheck; scripts/test installs it as root)"
        )
    scripts = shell_scripts()
    names = {str(p.relative_to(REPO)) for p in scripts}
    assert {"scripts/test", "scripts/bootstrap.sh", "tests/docker/run.sh", ".ci/run"} <= names, names
    result = subprocess.run(
        ["shellcheck", "--external-sources", *map(str, scripts)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr


def test_kubernetes_manifests_validate_strictly_against_a_release_with_native_sidecars() -> None:
    assert MANIFESTS, "compose-examples/kubernetes/*.yaml"
    result = subprocess.run(
        [_venv_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(_documents(p)) for p in MANIFESTS), result.stdout


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    """Strict mode is what catches a misspelt field (plain schema validation lets it through)."""
    bad = tmp_path / "typo.yaml"
    text, typos = re.subn(
        r"(?m)^(\s+)restartPolicy: Always$", r"\1restartPolicyy: Always", MANIFESTS[0].read_text()
    )
    assert typos == 1
    bad.write_text(text)
    result = subprocess.run(
        [_venv_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "restartPolicyy" in result.stdout + result.stderr


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _relay_sidecars() -> list[dict[str, Any]]:
    found = []
    for path in MANIFESTS:
        for doc in _documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            found += [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return found


def test_the_relay_sidecar_keeps_probes_resources_and_a_locked_down_security_context() -> None:
    sidecars = _relay_sidecars()
    assert sidecars, "a native sidecar (init container with restartPolicy: Always)"
    for relay in sidecars:
        for probe in ("startupProbe", "readinessProbe"):
            assert relay[probe]["httpGet"]["path"] == "/readyz", probe
        assert {"cpu", "memory"} <= relay["resources"]["requests"].keys()
        assert "memory" in relay["resources"]["limits"]
        security = relay["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


def test_the_manifest_says_what_relay_connections_active_means_per_pod() -> None:
    text = "\n".join(p.read_text() for p in MANIFESTS)
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "relay_connections_active" in comments
