"""One way to answer bad JSON: 422 naming each field and why (issue 3 §8)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

M = TypeVar("M", bound=BaseModel)


class BadRequest(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _field(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(body)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    # model-level checks name their field in the message ("id_number: …")
    if loc == "(body)" and ": " in msg:
        loc, msg = msg.split(": ", 1)
    return f"{loc}: {msg}"


async def parse(request: Request, model: type[M]) -> M:
    """The request body as ``model``; raises BadRequest carrying a 400/422 response."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest(JSONResponse({"error": "Content-Type must be application/json"}, status_code=415))
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            text = _field(err)
            field, _, message = text.partition(": ")
            errors.append({"field": field, "message": message})
        return_value = JSONResponse({"error": "invalid " + model.__name__, "errors": errors}, status_code=422)
        raise BadRequest(return_value) from None
