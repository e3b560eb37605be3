"""The error a configuration that cannot run raises (a leaf module: every layer may raise it)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""
