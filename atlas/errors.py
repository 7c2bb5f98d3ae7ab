"""The errors a user sees: one line each, caught by the CLI, never a deep traceback."""


class AtlasError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits 1."""

    exit_code = 1


class ConfigError(AtlasError):
    """A malformed or impossible config; names the file and the key. Exit code 2."""

    exit_code = 2
