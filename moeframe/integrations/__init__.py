"""Integrations of moeframe with other libraries (each an optional extra)."""
