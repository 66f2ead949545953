"""framelabel's exceptions, one tree for the service and the pipeline.

    FramelabelError
    ├── ConfigError            a config file or flag is wrong (names the field)
    ├── InvalidImageError      an image the classifier cannot accept (ValueError too)
    └── AnnotatorError         an Annotate call failed for a reason other than the image
        └── AnnotatorUnavailable   the target stayed unreachable after retries

Library errors (OpenCV, simplejpeg, onnxruntime, grpc) are translated into these
where they enter our code, so callers never match on a third-party type.
"""

from __future__ import annotations


class FramelabelError(Exception):
    """Base of every error framelabel raises on purpose."""


class ConfigError(FramelabelError):
    """A configuration value is missing or wrong; the message names it."""


class InvalidImageError(FramelabelError, ValueError):
    """The image cannot be annotated: empty, not JPEG/PNG, corrupt, or over a limit."""


class AnnotatorError(FramelabelError):
    """An Annotate call failed; `code` is the gRPC status name when there was one."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class AnnotatorUnavailable(AnnotatorError):
    """The Annotate target could not be reached, even after retries."""
