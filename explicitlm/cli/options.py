"""A program's command line: `[--config-name NAME] section.key=value ...` and its --help.

Each program names the config keys it reads and the ones it cannot run without (`Program`); --help
lists them by section with their defaults and the descriptions written in the schema
(`explicitlm.config`).
"""

from __future__ import annotations

import functools
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explicitlm.config import Config, ConfigError, load_config, schema_fields


@dataclass
class Program:
    """What one program reads: the config keys (sections or single keys) its --help lists and the
    keys it cannot run without."""

    name: str
    about: str
    keys: tuple[str, ...] = ("model", "dataset", "training", "logging", "serve", "eval")
    required: tuple[str, ...] = ()

    def reads(self, key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in self.keys)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def help_text(program: Program) -> str:
    """--help: the program's keys by section with defaults and descriptions, required keys first."""
    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    out = [
        f"usage: {program.name} [--config-name NAME] [--debug] [section.key=value ...]",
        "",
        program.about,
        "",
        "--config-name NAME   read configs/NAME.yaml (or a YAML path) before the key=value overrides",
        "--debug              show the traceback of an error instead of its one-line message",
    ]
    entries = [e for e in schema_fields() if program.reads(e[0])]
    groups: dict[str, list] = {}
    for key, default, text, _ in entries:
        title = "required" if key in program.required else key.split(".", 1)[0]
        groups.setdefault(title, []).append((key, default, text))
    order = ["required"] + list(dict.fromkeys(k.split(".", 1)[0] for k in program.keys))
    for title in sorted(groups, key=order.index):
        out += ["", f"{title}:"]
        for key, default, text in groups[title]:
            head = f"  {key}" if title == "required" else f"  {key}={_shown(default)}"
            lines = textwrap.wrap(text, width - 38) or [""]
            if len(head) > 36:  # a long default: the description goes below it
                out.append(head)
                out += [" " * 38 + line for line in lines]
            else:
                out.append(f"{head:<38}{lines[0]}".rstrip())
                out += [" " * 38 + line for line in lines[1:]]
    out += ["", "A list key takes [a,b] or one bare value; the reference's --section.key=value spelling works too."]
    return "\n".join(out)


def load_cli(
    argv: list[str] | None = None, program: Program | None = None, default_config: str | None = None
) -> Config:
    """`[--config-name NAME] key=value ...` -> Config, or raises ConfigError; --help prints the
    program's keys and exits 0."""
    script = Path(sys.argv[0])
    called = f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name
    program = program or Program(called, "Configuration keys of ExplicitLM.")
    argv = list(sys.argv[1:] if argv is None else argv)
    name = default_config
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(program))
            raise SystemExit(0)
        if arg == "--config-name":
            if i + 1 >= len(argv):
                raise ConfigError("--config-name needs a value (a name under configs/ or a YAML path)")
            name = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg == "--debug":  # the command around the program has taken it
            pass
        elif arg.startswith("--") and "=" in arg:  # the reference's `--section.key=value` spelling
            overrides.append(arg[2:])
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}': options are --config-name, --debug and --help")
        else:
            overrides.append(arg)
        i += 1
    cfg = load_config(name, overrides)
    helps = {key: text for key, _, text, _ in schema_fields()}
    for key in program.required:
        if functools.reduce(getattr, key.split("."), cfg) in ("", None):
            raise ConfigError(f"{key} is required: {helps.get(key) or 'see --help'}")
    return cfg
