"""Errors pgbackup reports: each message names the file or object and what to do."""


class PgBackupError(Exception):
    """Any failure pgbackup reports to the operator; str() is the one-line message."""


class KeyFileError(PgBackupError):
    """The key file is missing, unreadable or malformed."""


class WrongKeyError(PgBackupError):
    """The data was encrypted with another key."""


class CorruptError(PgBackupError):
    """An encrypted file or a backup set is damaged, truncated or tampered with."""


class RefusedError(PgBackupError):
    """The operation would destroy or overwrite data, and was not forced."""


class BusyError(PgBackupError):
    """Another pgbackup process holds what this one needs."""
