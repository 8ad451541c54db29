"""Helpers shared by the Serve test modules: free ports, random LoRA adapters, a real local teacher server."""

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the route annotations here
from fastapi.responses import JSONResponse

FLIGHTS_TOOL = {"type": "function", "function": {
    "name": "FindFlights", "description": "Search flights",
    "parameters": {"type": "object", "properties": {"origin": {"type": "string"}}, "required": ["origin"]}}}
ASK = [{"role": "system", "content": "You book travel."}, {"role": "user", "content": "A flight from SF please"}]
TEACHER_ANSWER = {
    "id": "teacher-1", "object": "chat.completion", "created": 1, "model": "big-teacher",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_t", "type": "function",
                        "function": {"name": "FindHotels", "arguments": "{\"city\": \"Paris\"}"}}]}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout_s: float = 60.0, headers=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def make_adapter(base: str, out_dir: str, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


def strong_adapter(base: str, out: str, seed: int = 3) -> str:
    """A random LoRA strong enough to change the base model's greedy answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data.mul_(0.6)
    model.save_pretrained(out)
    return out


def echo(body: dict) -> dict:
    """The teacher's answer repeating the last user turn as the `note` argument (and in the text)."""
    said = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    call = {"id": "call_e", "type": "function", "function": {"name": "FindHotels",
                                                              "arguments": json.dumps({"note": said})}}
    message = {"role": "assistant", "content": f"You said: {said}", "tool_calls": [call]}
    return {**TEACHER_ANSWER, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}


def start_teacher():
    """A real OpenAI-compatible server (uvicorn on 127.0.0.1) answering every agent with one fixed tool call;
    agents named sgd_Broken* get HTTP 500, sgd_Slow waits 2 s, sgd_Private gets a call that repeats its last user
    turn as an argument. Returns (namespace with url and seen bodies, stop())."""
    import uvicorn

    seen: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        if body["model"] == "sgd_Slow":
            await asyncio.sleep(2)
        if body["model"].startswith("sgd_Broken"):
            return JSONResponse({"error": {"message": "teacher is down for maintenance"}}, status_code=500)
        if body["model"] == "sgd_Private":
            return echo(body)
        return TEACHER_ANSWER

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", seen=seen), stop
