"""One small exception tree for labelwright, on the ground floor: every package raises these.

Every message names the row, column, file or setting at fault and says what to do about it.
Row-level problems (an empty text, a garbled controller answer) are not exceptions: they become
output rows with ``decided_by="unresolved"`` and a reason, so one bad row never sinks a batch.
"""


class LabelwrightError(Exception):
    """Base class of every error labelwright raises on purpose."""


class ConfigError(LabelwrightError):
    """A task spec, run setting or CLI flag is invalid."""


class InputDataError(LabelwrightError):
    """The input file cannot be labelled as given (missing column, duplicate ids, unreadable file)."""


class ControllerError(LabelwrightError):
    """The controller endpoint cannot be used at all (unreachable, refuses every request)."""


class SpecialistError(LabelwrightError):
    """A specialist cannot be built, loaded or trained."""


class ModelAssetError(LabelwrightError):
    """A bundled model file is missing or does not match its recorded checksum."""
