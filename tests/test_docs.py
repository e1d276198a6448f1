"""The README's flags table matches the dataclasses; every flag has help text."""

from dataclasses import fields

from conftest import REPO

from fairseq_moe_cli.flags_table import DATACLASSES, markdown_table, split_section


def test_readme_flags_table_is_generated_from_the_dataclasses():
    readme = REPO / "README.md"
    _, table, _ = split_section(readme.read_text(encoding="utf-8"), readme)
    assert table.strip() == markdown_table().strip(), "run fairseq-moe-flags --write README.md"


def test_every_flag_has_help_and_a_moe_name():
    for dc in DATACLASSES:
        for f in fields(dc):
            if f.name.startswith("_"):
                continue
            assert f.metadata.get("help"), f"{dc.__name__}.{f.name} has no help"
            assert "moe" in f.name, f"{f.name}: MoE options carry 'moe' in their name"


def test_every_console_command_has_a_main_and_a_launcher():
    """setup.py's console commands import, expose ``main`` and have ``scripts/<name>.py``."""
    import importlib
    import re

    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    entries = re.findall(r'"(fairseq-moe-[\w-]+) = (fairseq_moe_cli\.(\w+)):main"', setup)
    assert len(entries) >= 10
    for command, module, name in entries:
        assert callable(getattr(importlib.import_module(module), "main", None)), command
        launcher = REPO / "scripts" / f"{name}.py"
        assert launcher.exists(), f"{command}: no launcher {launcher}"
        assert f"from {module} import main" in launcher.read_text(encoding="utf-8"), launcher
