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
