"""The ``moeframe`` command line: one module per command, wired up in :mod:`.main`."""
