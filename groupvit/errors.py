"""The two kinds of user error every stage reports as one clear line (no traceback)."""


class ConfigError(ValueError):
    """A params file, section or key is missing, unknown, mistyped or out of range."""


class DataError(ValueError):
    """Bad input data: the message names the file, key or column and what was expected."""
