"""The exceptions `models/` raises; `service/` maps each to one HTTP status in one place."""


class ConvLensError(Exception):
    """Base class: a problem a caller can act on, with a message that says what to do."""


class UnknownArchitecture(ConvLensError, ValueError):
    """An architecture name we do not build."""


class UnknownLayer(ConvLensError, ValueError):
    """A layer name that is neither a named layer, an alias nor a conv module."""


class DatasetMissing(ConvLensError, FileNotFoundError):
    """The dataset folder is not where we looked."""


class UnknownDataset(ConvLensError, ValueError):
    """A dataset name we do not read."""


class CheckpointError(ConvLensError):
    """A checkpoint that is missing, truncated, corrupted or for another architecture."""


class BadImage(ConvLensError, ValueError):
    """Bytes that are not an image we can decode, or an image over the limits."""


class InvalidArgument(ConvLensError, ValueError):
    """A value out of range (a channel index, a count) for the model at hand."""


class DiskFull(ConvLensError, OSError):
    """A write failed for want of space (ENOSPC); nothing half-written was left behind."""


class NoSuchChannel(InvalidArgument, LookupError):
    """A channel (or class) index past what the model at hand has: the index is well formed, the unit is absent."""
