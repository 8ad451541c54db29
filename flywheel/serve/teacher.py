"""The teacher: any OpenAI-compatible chat endpoint that answers agents the student cannot answer yet.

Serve forwards a request here when the agent has no production adapter or its route is "teacher" (drift). The
client is async (httpx), sends the caller's body with `model` replaced by the teacher's model name (or the agent
id) and `stream` off (Serve replays the finished answer as a stream itself), and authenticates with the API key
read from the environment variable named by `ServeConfig.teacher_api_key_env`.

    teacher = HTTPTeacher("https://integrate.api.nvidia.com/v1", model="meta/llama-3.3-70b-instruct")
    completion = await teacher.complete("sgd_Flights", {"messages": [...], "tools": [...]})

Timeouts, connection errors, non-2xx answers and bodies that are not a chat completion raise `TeacherError`,
which Serve reports as HTTP 502 with the teacher's message.

In the Serve app the client lives in its own deployment, `TeacherProxy`, which scales on its own (drift moves
traffic here; see flywheel/serve/autoscale.py). The Ingress calls it through a handle:

    answer = await teacher_proxy.complete.remote("sgd_Flights", body)
    # {"completion": {...}, "model": "<teacher model>"} or {"error": "<why>"} (the Ingress answers 502)

The Ingress still owns the request: its timeout (`request_timeout_s`, 504, which cancels the proxy's call) and
the capture of the teacher's answer.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import httpx
from ray import serve


class TeacherError(RuntimeError):
    """The teacher did not produce a chat completion; the message says why."""


class Teacher(Protocol):
    def model_for(self, agent: str) -> str: ...

    async def complete(self, agent: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class HTTPTeacher:
    """`POST {url}/chat/completions` on an OpenAI-compatible server."""

    def __init__(self, url: str, model: str = "", api_key_env: str = "FLYWHEEL_TEACHER_API_KEY",
                 timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.model = model
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))

    def model_for(self, agent: str) -> str:
        return self.model or agent

    async def complete(self, agent: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = {k: v for k, v in body.items() if k != "stream_options"}
        payload.update(model=self.model_for(agent), stream=False)
        endpoint = f"{self.url}/chat/completions"
        try:
            resp = await self._client.post(endpoint, json=payload)
        except httpx.TimeoutException:
            raise TeacherError(f"the teacher at {endpoint} did not answer within {self._client.timeout.read}s") from None
        except httpx.HTTPError as e:
            raise TeacherError(f"could not reach the teacher at {endpoint}: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            raise TeacherError(f"the teacher at {endpoint} answered HTTP {resp.status_code}: {_error_text(resp)}")
        try:
            completion = resp.json()
        except ValueError:
            raise TeacherError(f"the teacher at {endpoint} answered with a body that is not JSON") from None
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) \
                or not isinstance(choices[0].get("message"), dict):
            raise TeacherError(f"the teacher at {endpoint} answered with something that is not a chat completion")
        return completion

    async def aclose(self) -> None:
        await self._client.aclose()


def _error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if err:
            return str(err)[:500]
    except (ValueError, AttributeError):
        pass
    return resp.text[:500] or resp.reason_phrase


@serve.deployment(name="TeacherProxy")
class TeacherProxy:
    """One `HTTPTeacher` per replica; answers never raise across the handle: errors come back as `{"error"}`."""

    def __init__(self, url: str, model: str = "", api_key_env: str = "FLYWHEEL_TEACHER_API_KEY",
                 timeout_s: float = 60.0):
        self.teacher = HTTPTeacher(url, model, api_key_env, timeout_s)

    async def complete(self, agent: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"completion": await self.teacher.complete(agent, body), "model": self.teacher.model_for(agent)}
        except TeacherError as e:
            return {"error": str(e)}
