"""Errors phi-edge raises on purpose: one line that names the problem and the fix.

The CLIs print these without a traceback and exit non-zero; anything else is a bug.
"""


class PhiEdgeError(Exception):
    """A user-facing error. Its message names the problem and how to fix it."""


class ManifestError(PhiEdgeError):
    """The artifact folder or its manifest is missing, malformed or altered."""


class BackendUnavailableError(PhiEdgeError):
    """The runtime the artifact needs is not installed on this machine."""


class ContextLengthError(PhiEdgeError):
    """The prompt does not fit the artifact's context window."""
