"""The pip requirements of this project and the given extras: the container's dependency layer.

The Dockerfile runs it on pyproject.toml alone, before the source is copied in, so that editing code
keeps the layer of dependencies. A project's own extras inside another (`docker-vit[ray,runpod]` in
`test`) are expanded. Standard library only (and pip's own TOML reader on Python 3.10).

    python requirements.py pyproject.toml runpod,ray > requirements.txt
"""

from __future__ import annotations

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The project's dependencies, then those of each extra asked for or implied, in order."""
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(
            f"EXTRAS: no extra {', '.join(unknown)} in this project; it has {', '.join(optional)}"
        )
    wanted = list(dict.fromkeys(extras))
    for extra in wanted:  # grows while the project's own extras turn up
        for requirement in optional[extra]:
            wanted += [e for e in _own_extras(requirement, project["name"]) if e not in wanted]
    chosen = [r for extra in wanted for r in optional[extra] if not _own_extras(r, project["name"])]
    return list(project.get("dependencies", [])) + chosen


def _own_extras(requirement: str, name: str) -> list[str]:
    """The extras of a requirement on the project itself (`docker-vit[ray,runpod]`); [] for others."""
    compact = requirement.replace(" ", "")
    if not compact.startswith(f"{name}["):
        return []
    return [extra for extra in compact[len(name) + 1 : compact.index("]")].split(",") if extra]


def main(argv: list[str]) -> None:
    path, extras = argv[0], argv[1] if len(argv) > 1 else ""
    with open(path, "rb") as file:
        project = tomllib.load(file)["project"]
    print("\n".join(requirements(project, [e.strip() for e in extras.split(",") if e.strip()])))


if __name__ == "__main__":
    main(sys.argv[1:])
