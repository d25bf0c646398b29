"""The moeframe plugin contract: every hook a plugin may implement.

A plugin is a module (or any object) exposed through the ``moeframe`` entry-point group::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.moeframe]
    my_plugin = "my_package.plugin"

and implements one or more of the hooks below, marked with :data:`moeframe.hookimpl`.
Each ``register_*`` hook returns an iterable of :class:`moeframe.Strategy` records; the
registry adds the kind and the provider (the distribution's name and version).

moeframe's own strategies are registered through these same hooks, by the builtin plugin
:mod:`moeframe.builtin`.

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
    from moeframe.plugins.records import Strategy

PROJECT_NAME = "moeframe"
#: The version of this hook contract.  A plugin module may declare the version it relies
#: on (``moeframe_plugin_api = N``): a host older than N refuses it with "upgrade
#: moeframe".  It goes up whenever something is added that a plugin may rely on (a hook,
#: a hook argument, a member the host calls).
PLUGIN_API_VERSION = 2
#: The oldest contract version a plugin may declare and still be loaded; it goes up when
#: a deprecated hook or member is removed (after one release of warnings).
OLDEST_SUPPORTED_PLUGIN_API = 1

#: Marks a hook specification (moeframe's own; plugins never need it).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function of a plugin module as the implementation of a moeframe hook
#: (re-exported as :data:`moeframe.hookimpl`).
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_routers() -> Iterable[Strategy]:
    """Return router strategies: router logits -> :class:`moeframe.TopKOutput`
    (``weights [T, K]``, ``ids [T, K]``, ``weight_on_input``).

    Called once when the router registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.routers.Router` and implement ``select``.
    """


@hookspec
def register_kernels() -> Iterable[Strategy]:
    """Return expert-kernel strategies: the experts computation for routed tokens.

    Called once when the kernel registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.kernels.Kernel` and compute what the ``torch`` reference kernel
    computes, within the dtype's tolerance (``moeframe check`` verifies it).
    Declare ``capabilities`` honestly: the composer refuses stacks outside them.
    """


@hookspec
def register_dispatchers() -> Iterable[Strategy]:
    """Return dispatcher strategies: move tokens to the ranks owning their experts and back.

    Called once when the dispatcher registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.dispatchers.Dispatcher`.
    """


@hookspec
def register_runners() -> Iterable[Strategy]:
    """Return runner strategies: the route -> dispatch -> kernel -> combine orchestration.

    Called once when the runner registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.runners.Runner`.
    """


@hookspec
def register_wrappers() -> Iterable[Strategy]:
    """Return wrapper strategies: runners that wrap an inner runner.

    Called once when the wrapper registry is first used.  Each ``impl`` must subclass
    :class:`moeframe.wrappers.Wrapper`; ``rules`` on the record says where the wrapper may
    sit in ``stack.wrappers``.
    """


#: hook name for each strategy kind
HOOK_FOR_KIND: dict[str, str] = {
    "router": "register_routers",
    "kernel": "register_kernels",
    "dispatcher": "register_dispatchers",
    "runner": "register_runners",
    "wrapper": "register_wrappers",
}
