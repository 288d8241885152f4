"""Errors that are the user's to fix: the entry point prints one line and exits with code 2."""

EXIT_USAGE = 2  # bad config, bad path, bad checkpoint: nothing was lost, fix the input and rerun
EXIT_INTERRUPTED = 3  # SIGINT/SIGTERM: the current step finished and a checkpoint was saved
EXIT_RANK_FAILED = 1  # a collective timed out or lost a rank: as a crash, so torchrun --max-restarts restarts it


class UserError(Exception):
    """A problem with the user's input (config, paths, data, checkpoints), with the fix in the message."""


class WriteError(UserError):
    """The run folder or a checkpoint could not be written (permissions, full disk); nothing older was lost."""


class ConfigError(UserError):
    """A config value is unknown, mistyped or impossible. `key` is the dotted path that names it."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key placed under a parent section (e.g. 'threshold' -> 'semi.threshold')."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message)


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was saved."""


class RankFailure(Exception):
    """A collective timed out (a rank hung) or lost a rank (it died); the message names the collective."""
