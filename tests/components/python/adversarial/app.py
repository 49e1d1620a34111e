"""A misbehaving `wasi:http` component for the limit tests (world
`trellis:lattice/http-component`, built by scripts/python-components.sh).

- `/loop` never returns: it spins in Python until fuel or the timeout ends the invocation.
- `/bomb` allocates 1 MiB bytes objects forever, until the memory limit ends the invocation.
- `/ok` (and anything else) answers 200 `python ok`.

A host that enforces its limits per invocation answers `/ok` again right after either of the
others.
"""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

MIB = 1 << 20


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?", 1)[0]
        if path == "/loop":
            spin()
        elif path == "/bomb":
            bomb()
        respond(response_out, 200, b"python ok\n")


def spin() -> None:
    n = 0
    while True:
        n = (n + 1) & 0xFFFF


def bomb() -> None:
    hoard = []
    while True:
        # Distinct objects, each written to, so every page is really touched.
        hoard.append(bytes([len(hoard) & 0xFF]) * MIB)


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
