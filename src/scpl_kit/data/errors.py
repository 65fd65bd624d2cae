"""Data errors whose messages say what to do about them."""


class DatasetNotFoundError(FileNotFoundError):
    """Raw or prepared data is missing; the message says how to get it."""


class CorruptDataError(RuntimeError):
    """Prepared data does not match its recorded checksum or the requested config."""
