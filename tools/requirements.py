"""Prints the packages a development environment needs, read from
pyproject.toml (the one place where they are pinned): the build
requirements, the runtime dependencies and the extras named (default
"dev"); with --only, just the extras."""

import sys
import tomllib
from pathlib import Path

data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
args = sys.argv[1:]
only = "--only" in args
extras = [a for a in args if a != "--only"] or ["dev"]
reqs = [] if only else list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
for extra in extras:
    reqs += data["project"]["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs)))
