"""Optional integrations with other tools; each needs its own extra and is never imported by the core."""
