"""Meta-tests: what users can name must be documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import attrs
import pytest

from moeframe.cli.commands import BUILTIN_COMMANDS
from moeframe.cli.main import build_parser
from moeframe.config import ModelConfig, ParallelConfig
from moeframe.plugins import get_registry
from moeframe.plugins.hookspecs import HOOK_FOR_KIND

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_every_hook_is_in_the_plugin_guide():
    guide = text("plugin-guide.md")
    for hook in HOOK_FOR_KIND.values():
        assert f"`{hook}`" in guide, hook


def test_every_command_is_in_the_user_guide():
    guide = text("user-guide.md")
    for command, _, _ in BUILTIN_COMMANDS:
        assert f"`moeframe {command}" in guide, command
    # the commands of this repository's plugins (bench, e2e, tune) are listed there too
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices:
        assert f"`moeframe {command}" in guide, command


def test_every_command_line_option_is_documented():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in [*DOCS.glob("*.md"), ROOT / "README.md"])
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert re.search(rf"{re.escape(flag)}\b", docs), f"moeframe {command} {flag}"


def test_every_config_key_is_in_the_reference():
    reference = text("config.md")
    for cls in (ModelConfig, ParallelConfig):
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in reference, field.name


#: where the plugins of this repository document their strategies (third parties: their own docs)
PLUGIN_PAGES = {"moeframe-expert-stats": "config.md", "moeframe-triton": "triton.md"}


@pytest.mark.parametrize("entry", get_registry().entries(), ids=lambda e: f"{e.kind}-{e.name}")
def test_every_strategy_and_parameter_is_documented(entry):
    if entry.provider.builtin:
        page = text("config.md")
    elif entry.provider.name in PLUGIN_PAGES:
        page = text(PLUGIN_PAGES[entry.provider.name])
    else:
        pytest.skip(f"{entry.provider} documents its own strategies")
    assert f"`{entry.name}`" in page, entry.name
    params = getattr(entry.load(), "Params", None)
    for field in attrs.fields(params) if params is not None else ():
        assert f"`{field.name}`" in page, f"{entry.name}.{field.name}"


def test_every_environment_variable_is_documented():
    code = "\n".join(p.read_text() for p in (ROOT / "moeframe").rglob("*.py"))
    docs = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    for var in sorted(set(re.findall(r"MOEFRAME_[A-Z_]+", code))):
        assert var in docs, var
