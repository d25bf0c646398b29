"""moeframe-oldcontract: a plugin written against plugin API 1 (see pyproject.toml)."""
