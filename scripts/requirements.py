"""Prints requirements declared in pyproject.toml, one per line, for `pip install`.

    python scripts/requirements.py build        # [build-system] requires
    python scripts/requirements.py deps test    # [project] dependencies + the `test` extra

The test scripts install what each step needs from here, so pyproject.toml stays the one
list. Python 3.10 has no tomllib: a small reader of the two tables' string arrays stands in.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _load(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return _load_arrays(text)
    return tomllib.loads(text)


def _load_arrays(text: str) -> dict:
    """The string arrays of pyproject.toml, by table: enough for the keys read below."""
    data: dict = {}
    table: dict = data
    pattern = r'^\[([^\]]+)\]\s*$|^([\w.-]+)\s*=\s*\[(.*?)\]\s*$'
    for m in re.finditer(pattern, text, re.MULTILINE | re.DOTALL):
        if m.group(1):
            table = data
            for part in m.group(1).strip().split("."):
                table = table.setdefault(part, {})
        else:
            table[m.group(2)] = re.findall(r'"([^"]*)"', m.group(3))
    return data


def requirements(groups: list[str], text: str | None = None) -> list[str]:
    data = _load(PYPROJECT.read_text() if text is None else text)
    out: list[str] = []
    for group in groups:
        if group == "build":
            out += data["build-system"]["requires"]
        elif group == "deps":
            out += data["project"].get("dependencies", [])
        else:
            extras = data["project"]["optional-dependencies"]
            if group not in extras:
                raise SystemExit(f"no extra {group!r} in pyproject.toml: {sorted(extras)}")
            out += extras[group]
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1:])))
