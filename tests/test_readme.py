"""The README runs as written: every command of its bash blocks, in order, in a fresh directory.

A newcomer pastes the blocks top to bottom, so that is what this test does (issue #24), one bash
process a block (`set -euo pipefail`: the first command that exits non-zero fails the test, and
a block's shell variables, such as `$MINILM`, reach its later lines). Commands that would run
long are shortened by appending settings (argparse and the config take the last value given, so
an appended setting wins over the preset's and over the command's own):

- `threetowers train|pretrain|cache`, also under `torchrun`: `SHORT_TRAIN`, 2 steps of 16 pairs
  from a 64-pair world and no evaluation; `pretrain` also on 64 images (`SHORT_PRETRAIN`);
- `threetowers demo`: `--quick` (one seed) with the tiny model of tests/test_demo.py and
  `SHORT_TRAIN`'s budget, evaluated on 30 images (`SHORT_DEMO`);
- `threetowers world wds`: `-n 100` images;
- `torchrun`: `--master_port` of a free port (the suite's distributed tests may run beside it).

Not run: `python3 -m venv`, `. .venv/bin/activate` and `pip install` (CI has installed the project
with its test extras, which hold every optional package the README installs), `pytest` (the
suite this test belongs to), and every block the README marks with `<!-- readme-test: skip: WHY -->`
on the line before it: those need what CI has not (the network, two machines, an older NumPy), and
each is reported as a skipped test with its reason. ```python blocks are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_demo import TINY_PRETRAIN, TINY_RUN

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->")

SHORT_TRAIN = ["train.steps=2", "train.batch_size=16", "data.world.num_pairs=64", "eval.tasks=[]"]
SHORT_PRETRAIN = SHORT_TRAIN + ["pretrain.num_images=64", "pretrain.num_heldout=32"]
SHORT_DEMO = ["--quick", "imagenet_input_size=32", "ceiling_shots=2", TINY_PRETRAIN] + [  # later --run settings win
    a for o in TINY_RUN + SHORT_TRAIN[:3] + ["eval.num_images=30", "eval.retrieval_images=20"] for a in ("--run", o)]
NOT_RUN = ("python3 -m venv", ". .venv/bin/activate", "source .venv/bin/activate", "pip install", "pytest")


def bash_blocks(text: str) -> list[tuple[str, str | None]]:
    """(the block's text, why it is skipped or None) for every ```bash block, in order."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```bash":
            end = lines.index("```", i + 1)
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            blocks.append(("\n".join(lines[i + 1:end]), skip.group(1) if skip else None))
    return blocks


def without_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a # outside quotes, after a space)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def shorten(command: str, port: int) -> str:
    """One command as the README gives it -> as this test runs it (the rules in the docstring)."""
    extra: list[str] = []
    if re.match(r"(torchrun .*-m )?threetowers (train|pretrain|cache) ", command + " ") and "--help" not in command:
        extra = SHORT_PRETRAIN if " pretrain " in f" {command} " else SHORT_TRAIN
    elif command.startswith("threetowers demo"):
        extra = SHORT_DEMO
    elif command.startswith("threetowers world wds"):
        extra = ["-n", "100"]
    if command.startswith("torchrun "):
        command = command.replace("torchrun ", f"torchrun --master_port={port} ", 1)
    return " ".join([command, *map(shlex.quote, extra)])


def runnable(block: str, port: int) -> list[str]:
    """The block's commands as run here: continuation lines joined, comments dropped, `a && b`
    chains kept without their setup steps, each command shortened."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        steps = [s.strip() for s in without_comment(line).split(" && ") if s.strip()]
        steps = [shorten(s, port) for s in steps if not s.startswith(NOT_RUN)]
        if steps:
            commands.append(" && ".join(steps))
    return commands


BLOCKS = bash_blocks(README.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_readme_command_runs_in_order_in_a_fresh_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "THREETOWERS_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this venv's commands
    work = tmp_path / "work"
    work.mkdir()
    ran = []
    for block, skip in BLOCKS:
        commands = runnable(block, free_port())
        if skip or not commands:
            continue
        script = "set -euo pipefail -x\n" + "\n".join(commands) + "\n"
        done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README block failed:\n{block}\n--- output (tail) ---\n{(done.stdout + done.stderr)[-6000:]}"
        ran += commands
    # The parsing found what a newcomer runs: the demo, every training example, the export.
    assert sum(c.startswith("threetowers train ") for c in ran) >= 7 and any(c.startswith("threetowers demo") for c in ran)
    assert any(c.startswith("threetowers export") for c in ran) and (work / "exported" / "3t").is_dir()


@pytest.mark.parametrize("block", [b for b, skip in BLOCKS if skip], ids=lambda b: b.split()[0])
def test_blocks_the_readme_marks_as_not_runnable_here_say_why(block):
    pytest.skip(dict(BLOCKS)[block])


def test_the_shortening_rule():
    assert shorten("threetowers train 3t loss.kind=sigmoid", 1) == "threetowers train 3t loss.kind=sigmoid " + " ".join(
        shlex.quote(a) for a in SHORT_TRAIN)
    assert shorten("threetowers pretrain pretrain", 1).endswith("pretrain.num_heldout=32")
    assert shorten("torchrun --nproc_per_node=2 -m threetowers train 3t", 7).startswith(
        "torchrun --master_port=7 --nproc_per_node=2 -m threetowers train 3t train.steps=2")
    assert shorten("threetowers train --help", 1) == "threetowers train --help"
    assert runnable('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[x]" && threetowers demo', 1)[0] \
        .startswith("threetowers demo --quick ")
    assert runnable("pip install -e .  # extras\nMINILM=$(python -c \"print('#')\")  # a path\n", 1) == [
        "MINILM=$(python -c \"print('#')\")"]
