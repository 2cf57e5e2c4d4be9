"""Errors raised when reading, writing or fetching SAEs."""


class SAEFormatError(ValueError):
    """A file is missing, corrupt, or does not describe an SAE tdb_lens can run."""


class SAEHubError(RuntimeError):
    """An SAE could not be fetched from the Hugging Face hub."""
