"""The HTTP head of the polyglot pipeline test (world `trellis:polyglot/pipe-http`).

`GET /<input>` counts the request in the component's own key-value bucket (key `python-calls`),
then calls the next stage through its link to `example:pipeline/transform` with a trail holding
its own contribution, and answers 200 with every stage's contribution, one per line
(`<stage>: <note>`). A failed stage or link answers 502 with `error: <message>`.
"""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, store, transform
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = (request.path_with_query() or "/").split("?", 1)[0]
        text = path[1:] if path.startswith("/") else path
        try:
            with store.open("") as bucket:
                calls = atomics.increment(bucket, "python-calls", 1)
            note = f"#{calls}"
        except Err as error:
            note = f"kv: {error.value!r}"
        mine = transform.Stage(name="python", note=note)
        try:
            trail = transform.run(text, [mine])
        except Err as error:
            respond(response_out, 502, f"error: {error.value}\n".encode())
            return
        lines = "".join(f"{stage.name}: {stage.note}\n" for stage in trail)
        respond(response_out, 200, lines.encode())


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
