"""What the authentication tests of every gRPC service share: a token table written and loaded
as a service loads it at start, and the status code a call ends with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import grpc

from services.common.auth import Role, TokenTable


def token_table(path: Path, tokens: Mapping[str, tuple[str, Role]]) -> TokenTable:
    """`tokens` (`{token: (name, role)}`) written to the token file `path`, then loaded back."""
    TokenTable.write(path, tokens)
    return TokenTable.load(path)


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    """The status `call(request)` ends with: OK, or the code of the error it raises."""
    try:
        call(request, timeout=10)
    except grpc.RpcError as exc:
        return cast(grpc.Call, exc).code()
    return grpc.StatusCode.OK
