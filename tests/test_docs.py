"""The documentation: the flags reference page's table matches the dataclasses, every flag has
help text; the mkdocs site builds with --strict; the README stays short and links to every page
of the nav, and every page in docs/ is in the nav."""

import re
import subprocess
import sys
from dataclasses import fields

import yaml
from conftest import REPO

from fairseq_moe_cli.flags_table import DATACLASSES, FLAGS_PAGE, markdown_table, split_section

README_MAX_LINES = 200


def test_flags_page_table_is_generated_from_the_dataclasses():
    page = REPO / FLAGS_PAGE
    _, table, _ = split_section(page.read_text(encoding="utf-8"), page)
    assert table.strip() == markdown_table().strip(), f"run fairseq-moe-flags --write {FLAGS_PAGE}"


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


def _nav_pages(nav) -> list[str]:
    """The page paths (relative to docs/) of a mkdocs ``nav``, in order."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += _nav_pages(value)
        elif not re.match(r"[a-z]+://", value):  # an external link in the nav is not a page
            pages.append(value)
    return pages


def _mkdocs_config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def test_mkdocs_site_builds_strict(tmp_path):
    """``mkdocs build --strict`` (what ``make docs`` runs): no broken link or anchor, no page left
    out of the nav, no missing nav file."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", REPO / "mkdocs.yml"]
        + ["-d", tmp_path / "site"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{out[-4000:]}"
    assert "WARNING" not in out, out[-4000:]
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert (tmp_path / "site" / page).with_suffix(".html").exists(), page


def test_readme_is_short_and_links_to_every_page():
    config = _mkdocs_config()
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    n_lines = len(readme.splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines: move content to docs/"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    missing = [page for page in nav if f"docs/{page}" not in linked]
    assert not missing, f"README.md does not link to these pages of the nav: {missing}"
    for target in linked:
        assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"
    docs = REPO / "docs"
    on_disk = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    left_out = [page for page in on_disk if page not in nav]
    assert not left_out, f"pages in docs/ that mkdocs.yml's nav leaves out: {left_out}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
