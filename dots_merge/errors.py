"""Error types. Every user mistake raises a `DotsMergeError` whose message is one line that names the
file, key or tensor at fault; the CLI prints it without a traceback and exits with code 2."""


class DotsMergeError(Exception):
    """A problem with the user's input that the user can fix."""


class RecipeError(DotsMergeError):
    """The recipe file is missing, not YAML, or not a valid recipe."""


class ModelInputError(DotsMergeError):
    """A model folder or checkpoint file cannot be used."""


class NonFiniteError(ModelInputError):
    """An input tensor holds NaN or Inf."""


class OutputExistsError(DotsMergeError):
    """The output folder exists and is not empty."""


class RunMismatchError(DotsMergeError):
    """A run folder (or shared study) was started from another recipe, other weights, queries or settings."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a command; the message says what was kept and how to go on."""
