"""Prints the packages a development environment needs, read from
pyproject.toml (the one place where they are pinned): the build
requirements, the runtime dependencies and the extras named (default
"dev"); with --only, just the extras."""

import re
import sys
import tomllib
from pathlib import Path

data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
args = sys.argv[1:]
only = "--only" in args
extras = [a for a in args if a != "--only"] or ["dev"]
reqs = [] if only else list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
groups = data["project"]["optional-dependencies"]
self_ref = re.compile(r"^" + re.escape(data["project"]["name"]) + r"\[([^\]]+)\]$")


def expand(extra: str) -> list[str]:
    """An extra's requirements, with `factorch[a,b]` replaced by extras a and b."""
    out = []
    for req in groups[extra]:
        m = self_ref.match(req)
        out += [r for e in m.group(1).split(",") for r in expand(e.strip())] if m else [req]
    return out


for extra in extras:
    reqs += expand(extra)
print("\n".join(dict.fromkeys(reqs)))
