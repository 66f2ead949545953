"""The Annotate stage: `AnnotationRequest` in, `AnnotationResponse` out.

Both kinds, in-process and gRPC, look the same to the pipeline. They raise
`InvalidImageError` for a frame that will never be accepted, and
`AnnotatorError` for everything else.
"""

from typing import Protocol

from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse


class Annotator(Protocol):
    @property
    def description(self) -> str:
        """What this annotator calls, for logs (never secrets)."""
        ...

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        """`patient`: wait out an unavailable annotator (replay frames); False: fail fast (live frames)."""
        ...

    async def close(self) -> None: ...


__all__ = ["Annotator"]
