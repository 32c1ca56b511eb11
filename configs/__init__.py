"""YAML presets shipped with personalize (read with `personalize.presets`)."""
