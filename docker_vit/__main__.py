"""`python -m docker_vit`: the `docker-vit` command, for environments without the console script."""

from docker_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
