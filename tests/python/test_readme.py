"""The README's commands work as written on a fresh clone: every script it tells people to type
is in the repository, and one typed directly (`scripts/test.sh`, not `bash scripts/test.sh`)
has a shebang and is executable *in git* (mode 100755), not just in someone's working copy.

A fresh clone takes each file's mode from the index, so the index is what is checked.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
INTERPRETERS = {"bash", "sh", "python3", "python"}


def readme_commands(text: str) -> list[str]:
    """Command lines of the ```sh blocks, plus inline `...` spans that start with a script."""
    commands = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.S | re.M):
        logical = block.replace("\\\n", " ")
        commands += [line.strip() for line in logical.splitlines() if line.strip()]
    commands += [span for span in re.findall(r"`([^`\n]+)`", text)
                 if re.match(r"[\w.][\w./-]*\.sh\b|\.ci/run\b", span)]
    return commands


def invoked_paths(command: str) -> list[tuple[str, bool]]:
    """(repository path, typed directly) for every script a command line runs."""
    out = []
    for part in re.split(r"&&|\|\||[;|&]", command.split(" #", 1)[0]):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)  # VAR=value prefixes
        if not words:
            continue
        if words[0] in INTERPRETERS:
            args = [w for w in words[1:] if not w.startswith("-")]
            if args and "/" in args[0] and not args[0].startswith(("/", "~", "$")):
                out.append((args[0], False))
        elif "/" in words[0] and not words[0].startswith(("/", "~", "$")):
            out.append((words[0], True))
    return out


def git_modes() -> dict[str, str]:
    res = subprocess.run(["git", "-C", str(REPO), "ls-files", "-s"], capture_output=True,
                         text=True, check=True)
    modes = {}
    for line in res.stdout.splitlines():
        meta, path = line.split("\t", 1)
        modes[path] = meta.split()[0]
    return modes


def test_readme_command_parser_finds_the_scripts():
    cmds = readme_commands("x `scripts/a.sh -k y` and `node/`\n```sh\n"
                           "scripts/b.sh --x 1   # comment\nPETREL_BIN=p bash tests/c.sh\n"
                           "cargo test -p x\nmosquitto_sub -t 'a/#' \\\n    -v\n```\n")
    paths = sorted(p for c in cmds for p in invoked_paths(c))
    assert paths == [("scripts/a.sh", True), ("scripts/b.sh", True), ("tests/c.sh", False)]


def test_readme_commands_exist_and_are_executable_in_git():
    modes = git_modes()
    invoked = {}
    for command in readme_commands(README.read_text()):
        for path, direct in invoked_paths(command):
            invoked[path] = invoked.get(path, False) or direct
    # The two commands of "Two commands" at least; an empty list means the parser broke.
    assert invoked.get("scripts/test.sh") and invoked.get("scripts/run-node.sh"), invoked
    problems = []
    for path, direct in sorted(invoked.items()):
        if path not in modes:
            problems.append(f"{path}: not tracked by git")
            continue
        if not direct:
            continue
        if modes[path] != "100755":
            problems.append(f"{path}: mode {modes[path]} in git; a fresh clone gets "
                            f"'Permission denied' (git update-index --chmod=+x {path})")
        if not (REPO / path).read_bytes().startswith(b"#!"):
            problems.append(f"{path}: no #! line")
        if not os.access(REPO / path, os.X_OK):
            problems.append(f"{path}: not executable in this checkout")
    assert not problems, "\n".join(problems)


def test_ci_entry_point_is_executable_in_git():
    assert git_modes().get(".ci/run") == "100755"
