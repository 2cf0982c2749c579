"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class MashupError(Exception):
    """A problem the user can fix (bad config, missing file, bad data). Never raised for engine bugs."""


class ConfigError(MashupError):
    """A configuration value or file is invalid; the message names the field."""


class DataError(MashupError):
    """The task data is unusable; the message names the file and line."""


class DonorError(MashupError):
    """One donor is unusable; the scoring job records it as failed and carries on with the others."""

    def __init__(self, donor: str, reason: str):
        super().__init__(f"donor {donor!r}: {reason}")
        self.donor = donor
        self.reason = reason
