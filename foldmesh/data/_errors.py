"""The one error type of ``foldmesh.data``."""


class DataError(ValueError):
    """Bad input to the data path: the message names the file and the setting to fix.

    A ``ValueError``, so callers that already catch configuration errors catch it too.
    """
