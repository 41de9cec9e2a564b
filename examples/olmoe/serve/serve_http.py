"""HTTP helpers shared by loadgen.py and test_serve.py (standard library
only): a request with a JSON body, and the chunks of a streamed answer
(server-sent events: `data: {...}` lines, then `data: [DONE]`)."""
import json


def send(conn, method, path, body=None, raw=None):
    """Sends `method path` on an http.client connection with body as JSON
    (or raw text as given, or no body) and returns the response."""
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    return conn.getresponse()


def chunks(resp):
    """Yields the JSON object of each `data:` line of a streamed response, in
    order, then None if the stream ends with `data: [DONE]`."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            yield None
            return
        yield json.loads(line[6:])
