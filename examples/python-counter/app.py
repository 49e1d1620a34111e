"""The Python twin of examples/kv-counter: a `wasi:http` component that counts requests in
`wasi:keyvalue`.

Each request increments a key atomically and answers `python count: N`. The key is the request
path without its leading `/` and query (any character outside `A-Z a-z 0-9 _ -` becomes `_`), or
`count` for `/`. The bucket is opened with the empty identifier: the component's assignment
decides which bucket that is. A keyvalue error answers 500 with its text (`access-denied`,
`no-such-store` or `other: <message>`). Each request is logged through `wasi:logging`.

Built with componentize-py for the world `trellis:lattice/http-component` (see
scripts/python-components.sh); the `wit_world` modules are the bindings it generates.
"""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, logging, store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

CONTEXT = "python-counter"
KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or "/"
        key = key_for(path)
        try:
            n = count(key)
        except Err as error:
            text = describe(error.value)
            logging.log(logging.Level.ERROR, CONTEXT, f"{path}: {text}")
            respond(response_out, 500, f"{text}\n".encode())
            return
        logging.log(logging.Level.INFO, CONTEXT, f"{path} → {key} = {n}")
        respond(response_out, 200, f"python count: {n}\n".encode())


def count(key: str) -> int:
    """Increments `key` in the assigned bucket and returns its new value."""
    with store.open("") as bucket:
        return atomics.increment(bucket, key, 1)


def key_for(path_with_query: str) -> str:
    """The counter's key for a request path."""
    path = path_with_query.split("?", 1)[0]
    if path.startswith("/"):
        path = path[1:]
    if not path:
        return "count"
    return "".join(c if c in KEY_CHARS else "_" for c in path)


def describe(error: store.Error) -> str:
    if isinstance(error, store.Error_AccessDenied):
        return "access-denied"
    if isinstance(error, store.Error_NoSuchStore):
        return "no-such-store"
    if isinstance(error, store.Error_Other):
        return f"other: {error.value}"
    return f"other: {error!r}"


def respond(response_out: ResponseOutparam, status: int, body: bytes) -> None:
    headers = Fields.from_list(
        [("content-type", b"text/plain"), ("content-length", str(len(body)).encode())]
    )
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with outgoing.write() as stream:
        stream.blocking_write_and_flush(body)
    OutgoingBody.finish(outgoing, None)
