"""The `vmwipe` command: argument parsing, reports, one-line errors, exit codes.

- `agent`: the top-level parser, `main`, and the agent's commands (inspect,
  wipe, restore, loadvm, save, clone);
- `setup`: `ssdt` and `qemu-args`;
- `scrub`: `scrub` and the `save --scrub` option;
- `template`: `template` and the `clone --template` options;
- `libvirt`: `vmwipe libvirt ...`;
- `options`: argument types the subcommands share (`--region`);
- `__main__`: `python -m vmwipe.host_agent.cli`.

`vmwipe = vmwipe.host_agent.cli:main` and `python -m vmwipe.host_agent.cli`
both land in `agent.main`.
"""

from .agent import build_parser, main

__all__ = ["build_parser", "main"]
