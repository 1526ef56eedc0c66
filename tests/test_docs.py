"""The documentation cannot drift: every config snippet validates, every `procpoll …`
command parses, and the blocks marked runnable run against the emulator."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.config import parse_config
from procpoll.emulator import Emulator, generate_events

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<mark><!-- runnable -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```",
                   re.DOTALL)
EXAMPLE_ENDPOINT = "127.0.0.1:8765"
# A sink for fragments that show one section: the rest of a config is not the point.
FILLER_SINK = {"name": "filler", "type": "stdout"}


def blocks(lang: str, *, runnable: bool | None = None) -> list[tuple[str, str]]:
    """(where, body) of every fenced block of `lang` in the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match["lang"] != lang:
                continue
            if runnable is not None and bool(match["mark"]) != runnable:
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match["body"]))
    return found


def commands(body: str) -> list[list[str]]:
    """The `procpoll …` invocations of a shell block (continuations joined, comments cut)."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        if not re.search(r"(^|[\s/])procpoll\s", line):
            continue
        words = shlex.split(line, comments=True)
        while words and (words[0] == "sudo" or "=" in words[0]):  # sudo, VAR=value
            words = words[1:]
        if not words or Path(words[0]).name != "procpoll":
            continue  # procpoll is an argument here (journalctl -t procpoll …)
        argv = []
        for word in words[1:]:
            if word in ("|", "&&", ";", "||", "&") or "<" in word or ">" in word:
                break
            argv.append(word)
        found.append(argv)
    return found


@pytest.mark.parametrize(("where", "body"), blocks("toml"), ids=lambda v: str(v)[:40])
def test_every_toml_block_is_a_valid_config_or_section(where: str, body: str,
                                                       tmp_path: Path) -> None:
    """Each TOML snippet parses; with a sink added when it shows only other sections, it
    passes procpoll's validation (unknown keys, types, ranges)."""
    # Files the examples read (a webhook secret) exist on the reader's machine, not here.
    etc = tmp_path / "etc" / "procpoll"
    etc.mkdir(parents=True)
    (etc / "webhook-secret").write_text("whsec_" + "A" * 43 + "=\n", encoding="utf-8")
    document: dict[str, Any] = tomllib.loads(body.replace("/etc/procpoll/", f"{etc}/"))
    if "sinks" not in document:
        document["sinks"] = [FILLER_SINK]
    # Paths in examples point at /var/lib/…: keep the check about keys, not this machine.
    document.setdefault("ledger", {})
    if "url" not in document["ledger"]:
        document["ledger"]["path"] = str(tmp_path / "ledger.sqlite3")
    parse_config(document, where)


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for lang in ("sh", "console"):
        for where, body in blocks(lang):
            found.extend((where, argv) for argv in commands(body))
    return found


@pytest.mark.parametrize(("where", "argv"), _documented_commands(),
                         ids=lambda v: " ".join(v)[:50] if isinstance(v, list) else v)
def test_every_documented_command_parses(where: str, argv: list[str]) -> None:
    """Each `procpoll …` in the docs names a real sub-command with real options."""
    parser = cli._parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: procpoll {' '.join(argv)}"  # --help, --version
        return
    assert getattr(args, "func", None) is not None, f"{where}: no command in {argv}"


@pytest.mark.timeout(120)
def test_runnable_blocks_run_against_the_emulator(tmp_path: Path) -> None:
    """The blocks marked runnable: the config is saved as procpoll.toml (pointing at a
    live emulator) and every command in the shell blocks exits 0."""
    configs = blocks("toml", runnable=True)
    scripts = blocks("sh", runnable=True)
    assert configs and scripts, "no runnable blocks found"
    emulator = Emulator(confirm_window_s=5.0, hold_s=0.2, seed=3).start()
    try:
        emulator.enqueue(generate_events(40, seed=3))
        env = {**os.environ, "TENCENTCLOUD_SECRET_ID": emulator.secret_id,
               "TENCENTCLOUD_SECRET_KEY": emulator.secret_key}
        for _, body in configs:
            (tmp_path / "procpoll.toml").write_text(
                body.replace(EXAMPLE_ENDPOINT, emulator.endpoint), encoding="utf-8")
            for where, script in scripts:
                for argv in commands(script):
                    run = subprocess.run([sys.executable, "-m", "procpoll", *argv],
                                         cwd=tmp_path, env=env, capture_output=True,
                                         text=True, timeout=60, check=False)
                    assert run.returncode == 0, (
                        f"{where}: procpoll {' '.join(argv)} exited {run.returncode}\n"
                        f"{run.stderr[-2000:]}")
        assert emulator.stats()["confirmed"] == 40
    finally:
        emulator.stop()
