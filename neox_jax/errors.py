"""Every error neox-jax raises on purpose, in one place: a module anything may import (it imports nothing), so the
CLI and library users catch them without loading JAX or the converters. Each message names the bad value and the
setting to change; the CLI prints it as one line (`error: ...`) and exits 2."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the setting."""


class TrainingError(RuntimeError):
    """A run that cannot go on (it diverged); the message says what to do."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the run restoring it (other shapes, or a failed integrity probe)."""


class LaunchError(ValueError):
    """Distributed settings that cannot work; the message names the setting."""


class BadRecordError(ValueError):
    """An input record that cannot be read; the message names the file and the line."""


class UnknownSettingWarning(UserWarning):
    """A GPT-NeoX key that neox-jax does not know (a typo trains with the default)."""


class ChangedDefaultWarning(UserWarning):
    """A GPT-NeoX key left unset whose default changed between GPT-NeoX versions: says which one applies."""
