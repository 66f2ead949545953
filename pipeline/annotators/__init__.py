"""The Annotate stage: `AnnotationRequest` in, `AnnotationResponse` out.

Both kinds, in-process and gRPC, look the same to the pipeline. They raise
`InvalidImageError` for a frame that will never be accepted, and
`AnnotatorError` for everything else. An in-process one may know the picture
size its model works at (`input_size`), which the encoder can send instead of
a larger one. Each has a lifetime: `start()` loads the
model or reaches the service (raising `ConfigError` or `AnnotatorUnavailable`
when it cannot), `ready` says whether calls will be served, `close()` lets go
of threads and channels; `async with annotator:` does the first and the last.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from services.api.image_classifier_pb2 import AnnotationRequest, AnnotationResponse
from services.model_families import InputSize


class Annotator(Protocol):
    @property
    def description(self) -> str:
        """What this annotator calls, for logs (never secrets)."""
        ...

    @property
    def ready(self) -> bool:
        """Started and not closed: calls will be served."""
        ...

    @property
    def input_size(self) -> InputSize | None:
        """The smallest picture the model gives the same answer on, once started; None when unknown (a service)."""
        ...

    async def start(self) -> None: ...

    async def annotate(self, request: AnnotationRequest, *, patient: bool = True) -> AnnotationResponse:
        """`patient`: wait out an unavailable annotator (replay frames); False: fail fast (live frames)."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


class AnnotatorLifetime:
    """`async with` for an annotator: start() on entry, close() on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:  # failed or cancelled half-way: let go of what was opened
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


__all__ = ["Annotator", "AnnotatorLifetime"]
