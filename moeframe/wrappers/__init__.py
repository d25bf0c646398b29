"""Wrappers: runners that hold an inner runner and add a concern around it.

A wrapper talks to its inner runner only through the runner interface
(:class:`moeframe.runners.Runner`): ``self.inner.forward(...)``,
``self.inner.output_reduced``, ...  Its record's :class:`~moeframe.OrderingRules` say
where it may sit in ``stack.wrappers``; its ``output_reduced`` says whether its output is
already summed over the ranks that share the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from moeframe.runners import Runner

if TYPE_CHECKING:
    from moeframe.context import BuildContext

__all__ = ["Wrapper"]


class Wrapper(Runner):
    """Base class of wrapper strategies; built as ``cls(inner, context, params)``.

    A wrapper implements :meth:`forward`, calling ``self.inner.forward``; the default
    :attr:`output_reduced` passes the inner runner's on.  A wrapper that is not
    :attr:`transparent` is part of the reference stack.
    """

    #: The output equals the inner runner's (chunking, statistics, timing...).  Such
    #: wrappers are left out of the reference stack; a wrapper that changes the result
    #: (shared experts) sets this to False and is itself part of the reference.
    transparent: ClassVar[bool] = True

    def __init__(self, inner: Runner, context: BuildContext, params: Any) -> None:
        super().__init__(context, params)
        self.inner = inner

    @property
    def output_reduced(self) -> bool:
        return self.inner.output_reduced
