"""The README's settings table, written from the settings themselves (`config.setting`).

design: README.md holds the table between two marker lines; `python -m binserve.settings_doc
--write README.md` rewrites what is between them, `--check README.md` exits 1 when it differs (a
test runs the same comparison), and without arguments the table is printed. So the descriptions,
units, bounds and defaults are written once, beside the fields, and `--help` and the README say
the same.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from binserve.config import ServerConfig, bounds, env_var, flag, shown_default

BEGIN = "<!-- settings table: written by `python -m binserve.settings_doc --write README.md` (binserve/config.py) -->"
END = "<!-- end of settings table -->"


def table() -> str:
    """The settings as a Markdown table, one row each, in the dataclass's order."""
    rows = [
        "| setting | flag / environment variable | default | unit, bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in fields(ServerConfig):
        limits = ", ".join(part for part in (f.metadata["unit"], bounds(f)) if part)
        cells = [f"`{f.name}`", f"`{flag(f)}` / `{env_var(f)}`", shown_default(f), limits, f.metadata["doc"]]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def with_table(text: str) -> str:
    """`text` (README.md) with the block between the markers replaced by the current table."""
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"README.md needs the lines {BEGIN!r} and {END!r} around the settings table") from None
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    """`--write FILE`, `--check FILE`, or print the table."""
    if len(argv) == 2 and argv[0] in ("--write", "--check"):
        path = Path(argv[1])
        text = path.read_text()
        new = with_table(text)
        if argv[0] == "--write":
            path.write_text(new)
            return 0
        if new != text:
            print(f"{path}: the settings table differs from binserve/config.py; run --write {path}", file=sys.stderr)
            return 1
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
