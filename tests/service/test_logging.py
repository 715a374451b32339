"""JSON log lines carry the request id of the request that wrote them."""

from __future__ import annotations

import io
import json
import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.request_id import JsonFormatter, RequestId, RequestIdFilter


def test_json_log_lines_carry_the_request_id():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("lorag.test-json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    app = FastAPI()
    app.add_middleware(RequestId)

    @app.get("/work")
    def work() -> dict:
        log.info("working on it")
        return {}

    try:
        with TestClient(app) as client:
            assert client.get("/work", headers={"X-Request-ID": "job-7"}).headers["x-request-id"] == "job-7"
        log.info("outside any request")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["request_id"], inside["message"], inside["level"]) == ("job-7", "working on it", "INFO")
    assert outside["request_id"] == "-"
