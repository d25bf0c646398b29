"""moeframe's own commands, registered through the ``register_commands`` hook like any
plugin's (a builtin plugin, named in :data:`moeframe.plugins.manager.BUILTIN_PLUGINS`).

Each command lives in a module of :mod:`moeframe.cli` with ``add_arguments(parser)`` and
``run(args)``, named here as strings: registering imports none of them.
"""

from __future__ import annotations

from moeframe.plugins.commands import Register
from moeframe.plugins.hookspecs import hookimpl

#: name, module, help (in the order ``moeframe --help`` lists them)
BUILTIN_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("plugins", "moeframe.cli.plugins_cmd", "list installed plugins, their hooks, commands and what they provide"),
    ("list", "moeframe.cli.list_cmd", "list registered strategies by kind (or the packaged presets)"),
    ("explain", "moeframe.cli.explain", "show the resolved config and the composed stack"),
    ("run", "moeframe.cli.run", "run the configured stack, time it and check it against the reference"),
    ("check", "moeframe.cli.check", "check kernels against the torch reference kernel (the conformance kit)"),
)


@hookimpl
def register_commands(register: Register) -> None:
    for name, module, help in BUILTIN_COMMANDS:
        register(name, f"{module}:run", help=help, add_arguments=f"{module}:add_arguments")
