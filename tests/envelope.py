"""The one error envelope, as tests check it."""

from __future__ import annotations


def envelope_error(response, status: int) -> dict:
    """The response's error object, after checking the status and the envelope's exact shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error
