"""The moeframe plugin contract: every hook a plugin may implement.

A plugin is a module (or any object) exposed through the ``moeframe`` entry-point group::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.moeframe]
    my_plugin = "my_package.plugin"

and implements one or more of the hooks below, marked with :data:`moeframe.hookimpl`.
Each strategy hook (``register_routers`` ... ``register_wrappers``) returns an iterable of
:class:`moeframe.Strategy` records; the registry adds the kind and the provider (the
distribution's name and version).  ``register_commands(register)`` adds commands to the
``moeframe`` command line by calling ``register``.

moeframe's own strategies are registered through these same hooks, by the builtin plugin
:mod:`moeframe.builtin`, and its own commands by :mod:`moeframe.cli.commands`.

**Growing and versioning.**  Each implementation is called with the arguments it names
(pluggy's argument selection), so a hook can gain an argument without breaking the
implementations written before it.  A hook (or an argument) is deprecated by marking
its spec with pluggy's ``warn_on_impl`` (``warn_on_impl_args``) for one release; a plugin
implementing it is then warned, with its distribution's name, when it loads.  This is
contract version :data:`PLUGIN_API_VERSION`; a plugin module may declare
``moeframe_plugin_api = N``, the version it relies on (see the plugin guide's "Changes to
the contract").

Hooks are called once, the first time a registry is used (never on ``import moeframe``).
A hook that raises (``SystemExit`` included), or returns something that is not a
:class:`moeframe.Strategy`, is reported with its distribution's name and skipped; the
rest keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from moeframe.plugins.commands import Register
    from moeframe.plugins.records import Strategy

PROJECT_NAME = "moeframe"
#: The version of this hook contract.  A plugin module may declare the version it relies
#: on (``moeframe_plugin_api = N``): a host older than N refuses it with "upgrade
#: moeframe".  It goes up whenever something is added that a plugin may rely on (a hook,
#: a hook argument, a member the host calls).
PLUGIN_API_VERSION = 3
#: The oldest contract version a plugin may declare and still be loaded; it goes up when
#: a deprecated hook or member is removed (after one release of warnings).
OLDEST_SUPPORTED_PLUGIN_API = 1

#: Marks a hook specification (moeframe's own; plugins never need it).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function of a plugin module as the implementation of a moeframe hook
#: (re-exported as :data:`moeframe.hookimpl`).
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_routers() -> Iterable[Strategy]:  # type: ignore[empty-body]  # a specification: never called
    """Return router strategies: router logits -> :class:`moeframe.TopKOutput`
    (``weights [T, K]``, ``ids [T, K]``, ``weight_on_input``).

    Called once when the router registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.routers.Router` and implement ``select``.
    """


@hookspec
def register_kernels() -> Iterable[Strategy]:  # type: ignore[empty-body]  # a specification: never called
    """Return expert-kernel strategies: the experts computation for routed tokens.

    Called once when the kernel registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.kernels.Kernel` and compute what the ``torch`` reference kernel
    computes, within the dtype's tolerance (``moeframe check`` verifies it).
    Declare ``capabilities`` honestly: the composer refuses stacks outside them.
    """


@hookspec
def register_dispatchers() -> Iterable[Strategy]:  # type: ignore[empty-body]  # a specification: never called
    """Return dispatcher strategies: move tokens to the ranks owning their experts and back.

    Called once when the dispatcher registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.dispatchers.Dispatcher`.
    """


@hookspec
def register_runners() -> Iterable[Strategy]:  # type: ignore[empty-body]  # a specification: never called
    """Return runner strategies: the route -> dispatch -> kernel -> combine orchestration.

    Called once when the runner registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.runners.Runner`.
    """


@hookspec
def register_wrappers() -> Iterable[Strategy]:  # type: ignore[empty-body]  # a specification: never called
    """Return wrapper strategies: runners that wrap an inner runner.

    Called once when the wrapper registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.wrappers.Wrapper`; ``rules`` on the record says where the wrapper may
    sit in ``stack.wrappers``.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Add commands to the ``moeframe`` command line: call ``register`` once per command::

        register(name, run, *, help, add_arguments=None, description=None)

    ``run(args) -> int`` runs the command with the parsed :class:`argparse.Namespace` and
    returns its exit status (``None`` counts as 0); ``add_arguments(parser)`` adds its
    arguments to its :class:`argparse.ArgumentParser`; either may be ``"module:function"``,
    imported only when the command is used, so that ``moeframe --help`` stays fast.
    ``help`` is the one line ``moeframe --help`` shows.  A
    :class:`moeframe.errors.UserError` raised by ``run`` is shown as one line with exit
    status 2, as for moeframe's own commands.

    Called once, when the plugins load.  A name taken by a builtin command, or by another
    plugin's command, is a plugin error naming both distributions (two plugins: the name is
    unusable until one goes).  moeframe's own commands are registered through this hook
    too (:mod:`moeframe.cli.commands`).  Added in plugin API 3; nothing is returned.
    """


#: hook name for each strategy kind
HOOK_FOR_KIND: dict[str, str] = {
    "router": "register_routers",
    "kernel": "register_kernels",
    "dispatcher": "register_dispatchers",
    "runner": "register_runners",
    "wrapper": "register_wrappers",
}
