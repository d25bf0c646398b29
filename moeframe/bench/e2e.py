"""Deprecated: ``python -m moeframe.bench.e2e`` is ``moeframe e2e`` (or ``python -m
moeframe_bench.e2e``) from the ``moeframe-bench`` distribution; this entry point forwards to it
with a warning, for one release."""

from __future__ import annotations

import sys
import warnings

from moeframe.bench import MOVED

if __name__ == "__main__":
    warnings.warn(f"{MOVED}; `python -m moeframe.bench.e2e` is now `moeframe e2e`", FutureWarning, stacklevel=1)
    from moeframe_bench.e2e import main

    sys.exit(main())
