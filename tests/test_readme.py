"""The README's quick start is exactly two commands, and they are the ones the Makefile and CI run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_commands():
    assert quick_start_commands() == ["make serve", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [quick_start_commands()[1]]


def test_make_targets_set_up_first():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test"):
        assert re.search(rf"^{target}: setup$", makefile, re.M), target
    assert "./scripts/setup.sh" in makefile
    assert "kvtriton serve --demo" in makefile and "pytest" in makefile


def test_build_folder_is_not_ignored():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert not any(line.strip().rstrip("/") in ("build", "/build") for line in ignored)
