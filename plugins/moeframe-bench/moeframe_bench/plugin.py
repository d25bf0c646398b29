"""The moeframe plugin of moeframe-bench: the ``moeframe bench`` and ``moeframe e2e``
commands.

Registering imports nothing but this module: the commands' arguments and code are named
as ``"module:function"`` strings, imported when the command runs.
"""

from __future__ import annotations

from moeframe import hookimpl
from moeframe.plugins.commands import Register

#: the plugin contract this module was written for (``register_commands`` came in 3)
moeframe_plugin_api = 3


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "bench",
        "moeframe_bench.cli:run",
        add_arguments="moeframe_bench.cli:add_arguments",
        help="benchmark kernels, the stack and transformers' implementations against this machine's limits",
    )
    register(
        "e2e",
        "moeframe_bench.e2e:run",
        add_arguments="moeframe_bench.e2e:add_arguments",
        help="benchmark a whole transformers causal LM (prefill, decode) with transformers' experts and moeframe's",
    )
