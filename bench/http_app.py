"""The HTTP baseline: ``uvicorn bench.http_app:app``, an endpoint that only accepts JSON.

What a service would otherwise do to hand work to another one: POST the call. The
endpoint parses the body and answers 202, nothing more, so the row is the floor of
any HTTP hand-off.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.post("/tasks")
async def accept(request: Request) -> Response:
    await request.json()
    return Response(status_code=202)
