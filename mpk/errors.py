"""Exceptions raised for bad input and for failed compiler checks."""


class MpkError(Exception):
    """Base class of every error that mpk raises on purpose."""


class ConfigError(MpkError):
    """A model configuration is missing, malformed or unsupported."""


class CheckpointError(MpkError):
    """A checkpoint tensor is missing, malformed or has the wrong shape."""


class GraphError(MpkError):
    """An operator graph is malformed (unknown tensor, wrong shape, bad attribute)."""


class CompileError(MpkError):
    """The compiler cannot build a task graph for the requested target."""


class VerificationError(MpkError):
    """The task graph leaves a hazard unordered or can deadlock."""


class RuntimeStallError(MpkError):
    """An execution stopped making progress; the message names the stuck events."""


class SimulationError(MpkError):
    """A simulator input is inconsistent: an event can never fire or a worker waits forever."""
