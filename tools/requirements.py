"""Prints the packages a development environment needs, read from
pyproject.toml (the one place where they are pinned): the build
requirements, the runtime dependencies and the "dev" extra."""

import sys
import tomllib
from pathlib import Path

data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
extras = sys.argv[1:] or ["dev"]
reqs = list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
for extra in extras:
    reqs += data["project"]["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs)))
