"""scripts/requirements.py: what the container's dependency layer installs for its EXTRAS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements(extras: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "requirements.py"),
        str(ROOT / "pyproject.toml"),
        extras,
    ]
    return subprocess.run(command, capture_output=True, text=True)


def test_no_extras_is_the_dependencies_alone() -> None:
    lines = requirements("").stdout.split()
    assert "fastapi>=0.115.3" in lines and "torch>=2.6" in lines
    assert not [line for line in lines if line.startswith(("runpod", "ray", "pytest"))]


def test_an_extra_and_the_projects_own_extras_inside_another() -> None:
    assert "runpod>=1.6" in requirements(" runpod ").stdout.split()
    test = requirements("test").stdout.split()
    assert {"pytest>=8", "ray[serve]>=2.56.1", "runpod>=1.6", "efficientnet-lite-pytorch>=0.1"} <= set(test)
    assert not [line for line in test if line.startswith("docker-vit")]  # expanded, not installed from PyPI
    assert len(test) == len(set(test))


def test_an_unknown_extra_stops_the_build_with_one_line() -> None:
    done = requirements("runpod,gpu")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("EXTRAS: no extra gpu in this project; it has test, bench, ray")
