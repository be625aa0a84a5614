"""Slow, malformed and oversized clients: each gets its 400, 408 or 413 (an OpenAI error object)
within the limit, its connection is closed, and none holds a thread: 200 stalled connections add
no thread and are all gone after the header deadline, and the server keeps serving."""
import json
import socket
import threading
import time

import pytest

from serving import request, serving
from tarragon_jax.serving.server import HttpLimits

LIMITS = HttpLimits(max_body_bytes=4096, header_timeout_s=1.0, body_timeout_s=1.0)


@pytest.fixture(scope="module")
def url():
    with serving("qwen3_moe", 8, main=dict(limits=LIMITS)) as (_, _, _, servers):
        yield servers["main"][1]


def _connect(url: str) -> socket.socket:
    host, port = url[len("http://"):].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of the server's answer; the server then closes the connection."""
    t0, data = time.monotonic(), b""
    while True:
        part = sock.recv(65536)
        if not part:                                       # closed by the server
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), time.monotonic() - t0


def test_negative_content_length_is_a_400(url):
    with _connect(url) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}")
        status, body, _ = _answer(sock)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "malformed HTTP request" in body["error"]["message"]


@pytest.mark.parametrize("how", ["content-length", "chunked"])
def test_an_oversized_body_is_a_413(url, how):
    with _connect(url) as sock:
        if how == "content-length":                        # refused from the header, body never read
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n{")
        else:                                              # no length given: counted while read
            chunk = b"x" * 3000
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
                         (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2)
        status, body, _ = _answer(sock)
    assert status == 413 and "over the limit of 4096" in body["error"]["message"]


@pytest.mark.parametrize("sent,what", [
    (b"POST /generate HTTP/1.1\r\nHost: x\r\n", "headers"),                            # headers never end
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt_ids\"", "body"),  # body short
])
def test_a_slow_client_gets_408_within_the_limit(url, sent, what):
    with _connect(url) as sock:
        sock.sendall(sent)
        status, body, seconds = _answer(sock)
    assert status == 408 and f"{what} not complete within 1.0 s" in body["error"]["message"]
    assert 0.5 < seconds < 3.0


def test_stalled_connections_hold_no_thread_and_are_closed(url):
    threads = threading.active_count()
    socks = [_connect(url) for _ in range(200)]
    for s in socks:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-")      # half a header, then nothing
    time.sleep(0.3)
    assert threading.active_count() <= threads + 1                      # no thread per connection
    code, text = request(url + "/generate", {"prompt_ids": [3, 4], "max_new_tokens": 3})
    assert code == 200 and len(json.loads(text)["output_ids"]) == 3      # still serving meanwhile
    deadline = time.monotonic() + 5
    for s in socks:                                                     # each answered 408 and closed
        s.settimeout(max(0.1, deadline - time.monotonic()))
        status, _, _ = _answer(s)
        assert status == 408
        s.close()
