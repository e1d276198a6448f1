"""Print, check or rewrite the documentation's table of MoE command-line flags.

The table is generated from the dataclasses that define the flags: ``MoEConfig`` (the model's
options), ``MoELossConfig`` and ``MoEMonitorConfig`` (the MoE criteria's). It sits in the flags
reference page, ``docs/reference/flags.md``, between the markers ``<!-- flags:begin -->`` and
``<!-- flags:end -->`` (any other markdown file with the two markers works too).

    fairseq-moe-flags                                  # print the table
    fairseq-moe-flags --check docs/reference/flags.md  # exit 1 if the page's table is stale
    fairseq-moe-flags --write docs/reference/flags.md  # regenerate the page's table

``--check`` and ``--write`` without a path use ``docs/reference/flags.md`` (relative to the
current directory, the repository root). (Or ``python scripts/flags_table.py ...``.)
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path

from fairseq_moe_plugin.criterions.moe_criterion import MoELossConfig, MoEMonitorConfig
from fairseq_moe_plugin.models.moe_config import MoEConfig

BEGIN = "<!-- flags:begin -->"
END = "<!-- flags:end -->"
DATACLASSES = (MoEConfig, MoELossConfig, MoEMonitorConfig)
FLAGS_PAGE = Path("docs/reference/flags.md")  # the flags reference page, from the repository root


def flag_name(field_name: str) -> str:
    """``moe_expert_count`` -> ``--moe-expert-count``."""
    return "--" + field_name.replace("_", "-")


def _escape(text: str) -> str:
    """Make ``text`` safe inside a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _default(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _choices(f) -> list[str]:
    """The choices of a ``ChoiceEnum`` field (also inside ``Optional[...]``), else []."""
    candidates = [f.type, *getattr(f.type, "__args__", ())]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return [str(member.value) for member in candidate]
    return []


def table_rows(dataclass_types=DATACLASSES) -> list[tuple[str, str, str]]:
    rows = []
    for cls in dataclass_types:
        for f in fields(cls):
            if f.name.startswith("_"):  # FairseqDataclass's ``_name``
                continue
            help_text = f.metadata.get("help", "")
            choices = _choices(f)
            if choices:
                help_text += f" (choices: {', '.join(choices)})"
            rows.append((f"`{flag_name(f.name)}`", _default(f), _escape(help_text)))
    return rows


def markdown_table(dataclass_types=DATACLASSES) -> str:
    lines = ["| flag | default | help |", "| --- | --- | --- |"]
    lines += [
        f"| {flag} | {default} | {help_text} |"
        for flag, default, help_text in table_rows(dataclass_types)
    ]
    return "\n".join(lines) + "\n"


def split_section(text: str, path: Path) -> tuple[str, str, str]:
    """``text`` as (before and including the begin marker, section, end marker and after)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(
            f"{path}: expected exactly one '{BEGIN}' and one '{END}' marker "
            f"(found {text.count(BEGIN)} and {text.count(END)})"
        )
    start = text.index(BEGIN) + len(BEGIN)
    stop = text.index(END)
    if stop < start:
        raise SystemExit(f"{path}: '{END}' comes before '{BEGIN}'")
    return text[:start], text[start:stop], text[stop:]


def check(path: Path, table: str) -> int:
    _, section, _ = split_section(path.read_text(encoding="utf-8"), path)
    if section.strip() == table.strip():
        print(f"{path}: flags table is up to date")
        return 0
    diff = difflib.unified_diff(
        section.strip().splitlines(),
        table.strip().splitlines(),
        fromfile=f"{path} (flags table)",
        tofile="generated from MoEConfig, MoELossConfig and MoEMonitorConfig",
        lineterm="",
    )
    print("\n".join(diff))
    print(
        f"\n{path}: the flags table differs from the one generated from MoEConfig, "
        f"MoELossConfig and MoEMonitorConfig; run `fairseq-moe-flags --write {path}` to update it",
        file=sys.stderr,
    )
    return 1


def write(path: Path, table: str) -> int:
    text = path.read_text(encoding="utf-8")
    before, _, after = split_section(text, path)
    new_text = before + "\n" + table + after
    if new_text == text:
        print(f"{path}: flags table already up to date")
    else:
        path.write_text(new_text, encoding="utf-8")
        print(f"{path}: flags table rewritten")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        metavar="PAGE",
        type=Path,
        nargs="?",
        const=FLAGS_PAGE,
        help=f"exit 1 if PAGE's flags table differs from the generated one (default: {FLAGS_PAGE})",
    )
    mode.add_argument(
        "--write",
        metavar="PAGE",
        type=Path,
        nargs="?",
        const=FLAGS_PAGE,
        help=f"rewrite PAGE's flags table between the markers (default: {FLAGS_PAGE})",
    )
    args = parser.parse_args(argv)
    table = markdown_table()
    try:
        if args.check is not None:
            return check(args.check, table)
        if args.write is not None:
            return write(args.write, table)
    except OSError as err:
        raise SystemExit(f"flags_table: {err}") from err
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
