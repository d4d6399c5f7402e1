"""Search spaces shipped with the systems: one TOML file per system."""
