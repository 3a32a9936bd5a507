"""User-facing errors. The CLI prints their message on one line and exits with code 2."""


class AdaptLinkError(Exception):
    """Bad input from the user: the message names the file/input and the field at fault."""


class ModelSourceError(AdaptLinkError):
    """A model source (preset name or checkpoint directory) that cannot be used."""
