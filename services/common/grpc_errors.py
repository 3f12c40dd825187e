"""Expected errors to gRPC status codes: each servicer gives its table, this does the rest."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", bound=Exception)


def status_for(exc: Exception, table: Mapping[type[Exception], grpc.StatusCode]) -> grpc.StatusCode:
    """The status of the nearest class of `exc` in `table`; INTERNAL if none is listed."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL


def error_translator(
    base: type[E],
    table: Mapping[type[Exception], grpc.StatusCode],
    trailers: Callable[[E], Sequence[tuple[str, str]]] = lambda _exc: (),
) -> Callable[[F], F]:
    """A decorator for servicer methods: an expected `base` error aborts the call with its
    status code, its message as details, and the trailing metadata `trailers` gives."""

    def translate_errors(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except base as exc:
                metadata = tuple(trailers(exc))
                if metadata:
                    context.set_trailing_metadata(metadata)
                context.abort(status_for(exc, table), str(exc))

        return wrapper  # type: ignore[return-value]

    return translate_errors
