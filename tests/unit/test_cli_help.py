"""`--help` (issue 17 point 11): recipes and pipelines one per line with a description, every option explained,
and no pointer to a file the repository does not have."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from trainer.cli import build_parser
from trainer.recipes import PIPELINES, RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        out[name] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(sub, f"{name} {sub_name}")

    walk(build_parser(), "b1k-train")
    return out


PARSERS = _parsers()


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in PARSERS.items() for a in p._actions
               if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert not missing, missing


def _listed(text: str, title: str) -> dict[str, str]:
    """{name: description} of the lines under `title:` in a help text."""
    block = text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
    rows = [re.match(r"^  (\S+)\s{2,}(\S.*)$", line) for line in block.splitlines()]
    assert all(rows), block
    return {m[1]: m[2] for m in rows}


@pytest.mark.parametrize("command", ["fit", "export", "k8s submit"])
def test_recipes_are_listed_one_per_line_with_their_description(command):
    listed = _listed(PARSERS[f"b1k-train {command}"].format_help(), "recipes")
    assert sorted(listed) == sorted(RECIPES)
    assert listed["pi_behavior_debug"].startswith("Tiny pi-behavior on a synthetic BEHAVIOR-format dataset")


@pytest.mark.parametrize("command", ["pipeline", "k8s submit"])
def test_pipelines_are_listed_one_per_line(command):
    text = PARSERS[f"b1k-train {command}"].format_help()
    assert "pipelines: pipelines:" not in text and text.count("\npipelines:\n") == 1
    assert sorted(_listed(text, "pipelines")) == sorted(PIPELINES)


def test_help_refers_only_to_files_in_the_repository():
    for name, p in PARSERS.items():
        text = p.format_help()
        assert "§" not in text, f"{name}: a section of an outside document:\n{text}"
        for ref in re.findall(r"[\w./-]+\.md\b", text):
            assert os.path.exists(os.path.join(ROOT, ref)), f"{name} --help refers to {ref}, not in the repository"
