"""Review: feedback on captured answers, the review queue and its decisions, the status rows, and the review and
status pages driven in a real headless Chromium against the real Serve app.

    .venv/bin/python -m pytest tests/test_review.py -x -q

The pure tests need no Ray. The browser tests run one Serve app for the module (auth `keys`, a tiny Llama, a real
local teacher) and Chromium with its chromedriver from the OS packages (`apt-get install chromium
chromium-driver`); Selenium is pointed at both, so it never downloads a browser or a driver.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import httpx
import pytest

from flywheel.capture.store import LogStore
from flywheel.review import Forbidden, Invalid, NotFound, approve, correct, fill_queue, labels, list_items, \
    negative_records, record_feedback, superseded_records
from flywheel.review.pages import review_page, status_page
from flywheel.review.queue import flags, get_item
from flywheel.review.records import find_record
from flywheel.review.status import status_rows
from flywheel.schema import message
from flywheel.storage import Store

TOOLS = [{"type": "function", "function": {
    "name": "FindFlights", "description": "Search flights",
    "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "seats": {"type": "integer"}},
                   "required": ["origin"]}}}]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def call(name: str, args: dict) -> dict:
    return message("assistant", tool_calls=[{"id": "c0", "name": name, "arguments": json.dumps(args)}])


def record(rid: str, answer: dict, agent: str = "sgd_Flights", tenant: str = "acme", **kw) -> dict:
    return {"record_id": rid, "agent_id": agent, "tenant": tenant, "timestamp": 1000.0 + len(rid),
            "session_id": f"s-{rid}", "messages": [message("user", f"flights from SF ({rid})")],
            "tools_json": json.dumps(TOOLS), "response": answer, "model": kw.pop("model", "teacher:big"),
            "latency_ms": 5.0, "prompt_tokens": 3, "completion_tokens": 2, "feedback": None, "source": "serve",
            "extra_json": None, **kw}


# -- feedback ---------------------------------------------------------------------------------------------------
def test_feedback_checks_the_record_and_its_tenant(store):
    logs = LogStore(store)
    logs.write_records([record("r-part", call("FindFlights", {"origin": "SF"}))], name_from="t1")
    with LogStore(store, writer_id="test") as wal:
        wal.append([record("r-wal", call("FindFlights", {"origin": "LA"}), tenant="globex")])
        assert find_record(store, "r-wal")["tenant"] == "globex"  # from the open WAL segment
    assert find_record(store, "r-part", agent="sgd_Flights")["response"]["tool_calls"][0]["name"] == "FindFlights"
    assert find_record(store, "r-part", agent="sgd_Hotels") is None  # the agent narrows the search
    assert find_record(store, "nope") is None

    event = record_feedback(store, "r-part", "acme", "down", {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "FindFlights", "arguments": {"origin": "San Francisco"}}}]}, "SF!")
    assert event["score"] == -1 and event["correction"]["tool_calls"][0]["arguments"] == '{"origin":"San Francisco"}'
    names = store.list("feedback/sgd_Flights")
    assert len(names) == 1 and "r-part" in names[0] and names[0].split("-")[0].isdigit()
    record_feedback(store, "r-wal", "globex", "up")
    assert negative_records(store, "sgd_Flights") == {"r-part"}
    record_feedback(store, "r-part", "acme", "up")  # the latest rating counts
    assert negative_records(store, "sgd_Flights") == set()
    assert len(store.list("feedback/sgd_Flights")) == 3  # one object per event: nothing is rewritten

    with pytest.raises(Forbidden):
        record_feedback(store, "r-part", "globex", "down")
    with pytest.raises(NotFound):
        record_feedback(store, "missing", "acme", "down")
    assert record_feedback(store, "r-wal", None, "down")["tenant"] == "globex"  # open mode: no tenant check
    for kwargs, field in [({"rating": "meh"}, "rating"), ({"record_id": 5}, "record_id"),
                          ({"correction": {"role": "assistant"}}, "correction"),
                          ({"correction": {"role": "user", "content": "x"}}, "correction"),
                          ({"correction": {"tool_calls": [{"function": {"name": "F", "arguments": "{bad"}}]}},
                           "correction"), ({"comment": 5}, "comment")]:
        args = {"record_id": "r-part", "tenant": "acme", "rating": "down", **kwargs}
        with pytest.raises(Invalid) as e:
            record_feedback(store, **args)
        assert e.value.param == field, kwargs


# -- the queue ----------------------------------------------------------------------------------------------------
def test_flags_name_each_reason():
    ok = record("ok", call("FindFlights", {"origin": "SF", "seats": "2"}))  # "2" for an integer: lenient, valid
    assert flags(ok) == []
    reasons = {
        "undeclared": call("FindHotels", {"city": "Paris"}),
        "schema": call("FindFlights", {"seats": 2}),
        "leftover": message("assistant", '<tool_call>{"name": "FindFlights", "arguments": {'),
        "as_text": message("assistant", '{"name": "FindFlights", "arguments": {"origin": "SF"}}'),
        "empty": message("assistant", None),
    }
    for rid, answer in reasons.items():
        assert [f[0] for f in flags(record(rid, answer))] == ["invalid_tool_call"], rid
    shadow = {"shadow": {"model": "student:sgd_Flights@v1", "response": {
        "role": "assistant", "tool_calls": [{"function": {"name": "FindFlights", "arguments": {"origin": "SF"}}}]}}}
    same = record("same", call("FindFlights", {"origin": "SF"}), extra_json=json.dumps(shadow))
    assert flags(same) == []  # both answers agree (argument text normalised)
    differ = record("differ", call("FindFlights", {"origin": "LA"}), extra_json=json.dumps(shadow))
    (reason, _, extra), = flags(differ)
    assert reason == "teacher_disagreement" and extra["other"]["model"] == "student:sgd_Flights@v1"
    extra = {"confidence": 0.2, "guardrails": [{"name": "pii", "passed": False}, {"name": "size", "passed": True}]}
    got = flags(record("g", call("FindFlights", {"origin": "SF"}), feedback=-1.0, extra_json=json.dumps(extra)))
    assert [f[0] for f in got] == ["negative_feedback", "low_confidence", "guardrail"] and "pii" in got[2][1]


def test_fill_queue_is_incremental_and_idempotent(store):
    logs = LogStore(store)
    logs.write_records([record("r1", call("FindFlights", {"origin": "SF"})),
                        record("r2", call("FindHotels", {"city": "Paris"})),
                        record("h1", call("FindHotels", {}), agent="sgd_Hotels")], name_from="p1")
    record_feedback(store, "r1", "acme", "down", comment="wrong airport")
    out = fill_queue(store, "sgd_Flights")
    assert out["enqueued"] == {"invalid_tool_call": 1, "negative_feedback": 1} and out["records"] == 2
    items = {i["reason"]: i for i in list_items(store, ["sgd_Flights"])}
    assert items["negative_feedback"]["record_id"] == "r1" and items["negative_feedback"]["comment"] == "wrong airport"
    assert items["invalid_tool_call"]["record_id"] == "r2" and "FindHotels" in items["invalid_tool_call"]["detail"]
    assert items["negative_feedback"]["request"]["messages"][0]["content"] == "flights from SF (r1)"
    assert store.read_json("review/state/sgd_Flights.json")["parts"] == logs.part_names()

    assert fill_queue(store, "sgd_Flights")["enqueued"] == {}  # nothing new
    assert fill_queue(store, "sgd_Flights")["records"] == 0  # the cursor skips parts already scanned
    approve(store, items["invalid_tool_call"]["item_id"], "acme:reviewer")
    assert fill_queue(store, "sgd_Flights", since=0)["enqueued"] == {}  # a rescan never reopens an item
    assert get_item(store, items["invalid_tool_call"]["item_id"])["status"] == "approved"
    with LogStore(store, writer_id="serve-x") as wal:  # a new record, still in the WAL
        wal.append([record("r3", message("assistant", "<tool_call>{oops"))])
        assert fill_queue(store, "sgd_Flights")["enqueued"] == {"invalid_tool_call": 1}
    logs.compact()  # the same record again, now in a part: still one item
    assert fill_queue(store, "sgd_Flights")["enqueued"] == {}
    assert len(list_items(store, ["sgd_Flights"], status=None)) == 3
    assert [i["agent"] for i in list_items(store)] == ["sgd_Flights"] * 2  # open items, every agent
    assert fill_queue(store, "sgd_Hotels")["enqueued"] == {"invalid_tool_call": 1}  # FindHotels is not declared
    with pytest.raises(NotFound):
        get_item(store, "sgd_Flights.0123456789abcdef01234567")
    with pytest.raises(NotFound):
        get_item(store, "../etc.0123456789abcdef01234567")


def test_decisions_become_label_parts(store):
    logs = LogStore(store)
    logs.write_records([record("r1", call("FindFlights", {"origin": "SF"}), model="student:sgd_Flights@v1"),
                        record("r2", call("FindHotels", {"city": "Paris"}))], name_from="p1")
    record_feedback(store, "r1", "acme", "down")
    fill_queue(store, "sgd_Flights")
    items = {i["record_id"]: i for i in list_items(store, ["sgd_Flights"])}
    parts = set(logs.part_names())

    approved = approve(store, items["r1"]["item_id"], "acme:k1")
    assert approved["status"] == "approved" and approved["decision"]["reviewer"] == "acme:k1"
    fixed = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "FindFlights", "arguments": "{\"origin\": \"Paris\"}"}}]}
    corrected = correct(store, items["r2"]["item_id"], "acme:k1", fixed)
    assert corrected["status"] == "corrected" and corrected["decision"]["message"]["tool_calls"][0]["name"] == \
        "FindFlights"
    new_parts = set(logs.part_names()) - parts
    assert len(new_parts) == 2
    approve(store, items["r1"]["item_id"], "acme:k1")  # the same decision again: the same part
    assert set(logs.part_names()) - parts == new_parts
    assert len(store.list("review/labels/sgd_Flights")) == 2

    rows = {r["record_id"]: r for r in logs.read("sgd_Flights").to_pylist() if r["source"] == "review"}
    assert len(rows) == 2
    by_original = {json.loads(r["extra_json"])["review"]["original_record_id"]: r for r in rows.values()}
    label = by_original["r2"]
    lineage = json.loads(label["extra_json"])
    assert lineage["priority"] == 1 and lineage["review"]["item_id"] == items["r2"]["item_id"]
    assert lineage["review"]["reviewer"] == "acme:k1" and lineage["review"]["decision"] == "corrected"
    assert label["response"]["tool_calls"][0]["arguments"] == '{"origin":"Paris"}'
    assert label["messages"][0]["content"] == "flights from SF (r2)" and label["session_id"] == "s-r2"
    assert label["model"] == "review:acme:k1" and not label["model"].startswith("student:")
    assert by_original["r1"]["response"]["tool_calls"][0]["name"] == "FindFlights"  # the approved answer
    assert sorted(r["record_id"] for r in labels(store, "sgd_Flights")) == sorted(rows)
    assert superseded_records(store, "sgd_Flights") == {"r1", "r2"}
    assert fill_queue(store, "sgd_Flights")["enqueued"] == {}  # labels are never queued themselves

    with pytest.raises(Invalid) as e:
        correct(store, items["r2"]["item_id"], "acme:k1", {"role": "assistant", "content": "  "})
    assert e.value.param == "message"
    with pytest.raises(Invalid):
        approve(store, items["r2"]["item_id"], "")


# -- pages and status rows ----------------------------------------------------------------------------------------
def _status_home(store: Store, adapter) -> None:
    from flywheel.registry.registry import Registry

    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # registering copies a PEFT folder; nothing loads it here
    registry = Registry(store)
    for v, acc in (("v1", 0.6), ("v2", 0.9)):
        registry.register("sgd_Flights", str(adapter), {"dataset_version": "d"})
        registry.record_scores("sgd_Flights", v, {"function_name_accuracy": acc, "n": 33,
                                                  "function_name_accuracy_ci": [acc - 0.1, min(1.0, acc + 0.05)],
                                                  "gate": acc > 0.8})
    registry.promote("sgd_Flights", "v2")
    store.write_json("reports/sgd_Flights/v2/eval.json", {
        "metric": "function_name_accuracy", "teacher": {"function_name_accuracy": 1.0},
        "candidate": {"function_name_accuracy": 0.9, "function_name_accuracy_ci": [0.8, 0.95], "n": 33},
        "cost": {"student_per_1k_usd": 0.01, "teacher_per_1k_usd": 0.5, "teacher_over_student": 50.0},
        "gate": {"passed": True}})
    for i, share in enumerate((0.1, 0.7)):
        store.write_json(f"monitor/events/sgd_Flights-2024{i}.json", {
            "agent": "sgd_Flights", "time": 1_700_000_000 + 3600 * i, "drift_share": share, "threshold": 0.5,
            "id": f"e{i}", "retrain": None})
    store.write_json("controller/events/sgd_Flights-000000000000001-ab-monitor.json", {
        "agent": "sgd_Flights", "step": "monitor", "status": "no_drift", "at": 1_700_000_100,
        "detail": {"drift_share": 0.2}})
    store.write_json("controller/events/sgd_Flights-000000000000002-ab-promote.json", {
        "agent": "sgd_Flights", "step": "promote", "status": "done", "at": 1_700_000_200, "detail": "v2"})
    store.write_json("queue/retrain/sgd_Flights-e1.json", {"agent": "sgd_Flights", "event": "e1",
                                                           "reason": "drift event e1", "queued": 1.0})
    waiting_for_traffic(store, "sgd_Hotels")


def waiting_for_traffic(store: Store, agent: str) -> None:
    """A curated dataset of 200 train records and a learning curve that forecasts 1,900 for the goal."""
    from flywheel.evaluate.learning import save_curve

    store.write_json(f"datasets/{agent}/LATEST", {"version": "d1"})
    store.write_json(f"datasets/{agent}/d1/manifest.json", {"counts": {"train": 200, "validation": 30, "test": 60}})
    save_curve(store, agent, {"points": [{"n": 50}, {"n": 100}, {"n": 200}], "forecast": {
        "goal": 0.8, "n": 1900.0, "low": 900.0, "high": 5000.0, "plateau": False, "reached": False}})


def test_status_rows_and_pages(store, tmp_path):
    _status_home(store, tmp_path / "adapter")
    flights, hotels = status_rows(store, ["sgd_Flights", "sgd_Hotels"])
    assert flights["route"] == {"backend": "student", "mode": "student", "model": "sgd_Flights@v2", "reason": "production adapter",
                                "since": 0.0}
    q = flights["production"]
    assert (q["version"], q["metric"], q["value"], q["ci"], q["teacher"]) == \
        ("v2", "function_name_accuracy", 0.9, [0.8, 0.95], 1.0)
    assert flights["cost"]["saved_per_1k_usd"] == pytest.approx(0.49) and flights["cost"]["saved_share"] == \
        pytest.approx(0.98)
    assert [p["share"] for p in flights["drift"]["series"]] == [0.1, 0.2, 0.7] and flights["drift"]["threshold"] == 0.5
    assert [p["drifted"] for p in flights["drift"]["series"]] == [True, False, True]
    assert [v["value"] for v in flights["versions"]] == [0.6, 0.9] and flights["versions"][1]["production"]
    assert flights["last_cycle"]["step"] == "promote" and len(flights["retrain"]) == 1
    assert hotels["route"]["backend"] == "teacher" and hotels["production"] is None and hotels["cost"] is None
    assert hotels["drift"]["state"] == "no checks yet"
    assert flights["traffic"]["state"] == "served"  # its latest version passed the gate
    assert (hotels["traffic"]["state"], hotels["traffic"]["records"], hotels["traffic"]["forecast"]) == \
        ("waiting for traffic", 200, 1900.0)
    # The monitor's own state (its windows, its episode) and an episode event whose threshold is a test's alpha.
    store.write_json("monitor/state/sgd_Hotels.json", {"episode": {"id": "ep1", "active": True}, "history": [
        {"time": 1_700_000_000, "drifted": False, "drift_share": 0.1}, {"time": 1_700_000_600, "drifted": True}]})
    store.write_json("monitor/events/sgd_Hotels-ep1.json", {"agent": "sgd_Hotels", "time": 1_700_000_600,
                                                           "drift_share": 0.8, "threshold": 0.01, "alpha": 0.01})
    hotels = status_rows(store, ["sgd_Hotels"])[0]
    assert hotels["drift"]["state"] == "drift: episode ep1" and hotels["drift"]["threshold"] is None
    assert [(p["share"], p["drifted"]) for p in hotels["drift"]["series"]] == [(0.1, False), (0.8, True)]

    page = status_page([flights, hotels])
    assert page.count('<tr class="agent"') == 2 and page.count("<svg") == 4
    assert "sgd_Flights@v2" in page and "0.90 [0.80, 0.95] vs teacher 1.00" in page and "98%" in page
    assert "waiting for traffic" in page and "200 train records · goal 0.80 at ~1,900 (900-5,000)" in page
    assert 'class="hline"' in page and page.count('class="ci"') == 2
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    json.dumps([flights, hotels])  # /status.json serialises the same rows


def test_review_page_escapes_everything(store):
    evil = '<script>alert("x")</script>'
    LogStore(store).write_records([record("r1", message("assistant", f"<tool_call>{evil}"),
                                          messages=[message("user", evil)])], name_from="p")
    fill_queue(store, "sgd_Flights")
    page = review_page(list_items(store), "acme<b>", csrf="tok")
    assert "<script>" not in page and "&lt;script&gt;" in page and "acme&lt;b&gt;" in page
    item = list_items(store)[0]
    assert f'action="/review/{item["item_id"]}/approve"' in page and 'name="csrf" value="tok"' in page
    assert "<textarea" in page and page.count("<form") == 2


# -- the Serve app in a real browser --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    from ray import serve

    from flywheel.config import ServeConfig
    from flywheel.registry.registry import Registry
    from flywheel.routing import register_agent
    from flywheel.serve.app import run, shutdown
    from flywheel.serve.auth import KeyStore
    from serving import free_port, make_adapter, start_teacher

    teacher, stop_teacher = start_teacher()
    root = tmp_path_factory.mktemp("review")
    store = Store(str(root / "home"))
    registry = Registry(store)
    entry = registry.register("sgd_Flights", make_adapter(tiny_model, str(root / "adapter"), seed=0),
                              {"dataset_version": "test", "base_model": tiny_model})
    registry.record_scores("sgd_Flights", entry["version"], {"function_name_accuracy": 0.9,
                                                             "function_name_accuracy_ci": [0.8, 0.97], "n": 33})
    registry.promote("sgd_Flights", entry["version"])
    for agent in ("sgd_Flights", "sgd_Hotels"):
        register_agent(store, agent, tenant="catalog")
    keys = KeyStore(store)
    admin = keys.create("acme", ["*"], name="reviewer")[1]
    globex = keys.create("globex", ["sgd_Hotels"], name="globex")[1]
    cfg = ServeConfig(home=store.uri, base_model=tiny_model, port=free_port(), teacher_url=teacher.url, auth="keys",
                      auth_cache_s=0.5, replica_cpus=0.5, max_new_tokens=8, max_batch_size=4, batch_wait_s=0.05,
                      routing_ttl_s=0.3)
    serve.shutdown()  # HTTP options are fixed when Serve starts: start it fresh on our port
    url = run(cfg)
    yield SimpleNamespace(base=url[: -len("/v1")], url=url, store=store, admin=admin, globex=globex)
    shutdown()
    stop_teacher()


def ask(app, key: str, agent: str = "sgd_Hotels") -> str:
    """One answered request with a declared tool the teacher does not call: its record id."""
    body = {"model": agent, "messages": [{"role": "user", "content": "a hotel in Paris"}],
            "tools": [TOOLS[0]]}
    r = httpx.post(f"{app.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-flywheel-record-id"]


def feedback(app, key: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{app.url}/feedback", json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        missing = f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver"
        if os.environ.get("CI"):  # `make test` installs it as root; in CI a skip would hide a broken install
            pytest.fail(missing)
        pytest.skip(missing)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `pip install -e '.[dev]'` (the dev extra lists it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_feedback_endpoint(app):
    mine, theirs = ask(app, app.admin), ask(app, app.globex)
    r = feedback(app, app.admin, {"record_id": mine, "rating": "down", "comment": "no tool call for this",
                                  "correction": {"role": "assistant", "content": "Which dates?"}})
    assert r.status_code == 200 and r.json()["record_id"] == mine, r.text
    assert feedback(app, app.globex, {"record_id": theirs, "rating": "up"}).status_code == 200
    other = feedback(app, app.globex, {"record_id": mine, "rating": "down"})  # acme's record, globex's key
    assert other.status_code == 403 and other.json()["error"]["code"] == "permission_denied"
    missing = feedback(app, app.admin, {"record_id": "0" * 32, "rating": "down"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for body, field in [({"record_id": mine, "rating": "meh"}, "rating"), ({"rating": "down"}, "record_id"),
                        ({"record_id": mine, "rating": "up", "stars": 5}, "stars"),
                        ({"record_id": mine, "rating": "up", "correction": {"content": ""}}, "correction")]:
        bad = feedback(app, app.admin, body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, (body, bad.text)
    assert feedback(app, None, {"record_id": mine, "rating": "up"}).status_code == 401
    events = [app.store.read_json(f"feedback/sgd_Hotels/{n}") for n in app.store.list("feedback/sgd_Hotels")]
    assert sorted(e["tenant"] for e in events) == ["acme", "globex"]
    assert next(e for e in events if e["tenant"] == "acme")["correction"]["content"] == "Which dates?"


def shown(browser, element_id: str) -> str:
    """The text of the element once the page that has it has loaded (a form post redirects back to /review)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 60).until(expected_conditions.presence_of_element_located((By.ID, element_id))).text


def test_review_in_a_browser(app, browser):
    from selenium.webdriver.common.by import By

    store = app.store
    ask(app, app.admin)
    LogStore(store).write_records([record("flights-1", call("FindHotels", {"city": "Rome"}))], name_from="review-t")
    for agent in ("sgd_Hotels", "sgd_Flights"):
        fill_queue(store, agent)  # the controller's job, once per cycle
    hotels = list_items(store, ["sgd_Hotels"])
    assert {i["reason"] for i in hotels} == {"invalid_tool_call", "negative_feedback"} and len(hotels) >= 3

    browser.get(f"{app.base}/review")
    assert "Sign in" in browser.page_source  # no key, no cookie: the sign-in form
    browser.get(f"{app.base}/review?key={app.admin}")
    assert browser.current_url == f"{app.base}/review"  # the key left the address bar for an HttpOnly cookie
    cookie = browser.get_cookie("flywheel_key")
    assert cookie["httpOnly"] and cookie["value"] == app.admin
    on_page = {el.get_attribute("data-item") for el in browser.find_elements(By.CSS_SELECTOR, "div.item")}
    assert on_page == {i["item_id"] for i in list_items(store)}  # every open item of every agent ("*")

    first, second = hotels[0]["item_id"], hotels[1]["item_id"]
    browser.find_element(By.ID, f"item-{first}").find_element(By.CSS_SELECTOR, "form.approve button").click()
    assert f"approved: {first}" in shown(browser, "notice")
    assert get_item(store, first)["status"] == "approved"
    assert not browser.find_elements(By.ID, f"item-{first}")  # no longer open

    fixed = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "FindFlights", "arguments": {"origin": "Paris"}}}]}
    form = browser.find_element(By.ID, f"item-{second}").find_element(By.CSS_SELECTOR, "form.correct")
    box = form.find_element(By.TAG_NAME, "textarea")
    box.clear()
    box.send_keys("{not json")
    form.find_element(By.TAG_NAME, "button").click()
    assert "not valid JSON" in shown(browser, "error")  # refused, and said so on the page
    assert get_item(store, second)["status"] == "open"
    form = browser.find_element(By.ID, f"item-{second}").find_element(By.CSS_SELECTOR, "form.correct")
    box = form.find_element(By.TAG_NAME, "textarea")
    box.clear()
    box.send_keys(json.dumps(fixed))
    form.find_element(By.TAG_NAME, "button").click()
    assert f"corrected: {second}" in shown(browser, "notice")
    item = get_item(store, second)
    assert item["status"] == "corrected" and item["decision"]["reviewer"].startswith("acme:")
    assert item["decision"]["message"]["tool_calls"][0]["arguments"] == '{"origin":"Paris"}'
    review_labels = {json.loads(r["extra_json"])["review"]["item_id"]: r
                     for r in LogStore(store).read("sgd_Hotels").to_pylist() if r["source"] == "review"}
    assert set(review_labels) == {first, second}
    assert review_labels[second]["response"]["tool_calls"][0]["name"] == "FindFlights"

    # A form posted without the page's token (another site's form) is refused.
    r = httpx.post(f"{app.base}/review/{hotels[2]['item_id']}/approve", data={"csrf": "forged"},
                   headers={"Cookie": f"flywheel_key={app.admin}"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    # A JSON client decides with its key; another tenant's key sees and decides only its agents' items.
    flights_item = list_items(store, ["sgd_Flights"])[0]["item_id"]
    r = httpx.post(f"{app.base}/review/{flights_item}/approve", json={},
                   headers={"Authorization": f"Bearer {app.globex}"}, timeout=30)
    assert r.status_code == 403 and get_item(store, flights_item)["status"] == "open"
    r = httpx.post(f"{app.base}/review/sgd_Hotels.{'0' * 24}/approve", json={},
                   headers={"Authorization": f"Bearer {app.admin}"}, timeout=30)
    assert r.status_code == 404
    page = httpx.get(f"{app.base}/review", headers={"Authorization": f"Bearer {app.globex}"}, timeout=30).text
    assert flights_item not in page and hotels[2]["item_id"] in page


def test_status_in_a_browser(app, browser):
    from selenium.webdriver.common.by import By

    store = app.store
    store.write_json("monitor/events/sgd_Flights-x1.json", {"agent": "sgd_Flights", "time": time.time() - 60,
                                                            "drift_share": 0.6, "threshold": 0.5, "id": "x1"})
    store.write_json(f"controller/events/sgd_Flights-{int(time.time() * 1000):015d}-ab-evaluate.json", {
        "agent": "sgd_Flights", "cycle": "c1", "step": "evaluate", "status": "done", "at": time.time(),
        "detail": {"gate": True}})
    waiting_for_traffic(store, "sgd_Hotels")
    browser.get(f"{app.base}/review?key={app.admin}")  # signs in (the cookie is shared by every page)
    browser.get(f"{app.base}/status")
    rows = {el.get_attribute("id"): el.text for el in browser.find_elements(By.CSS_SELECTOR, "tr.agent")}
    assert set(rows) == {"agent-sgd_Flights", "agent-sgd_Hotels"}
    assert "student" in rows["agent-sgd_Flights"] and "sgd_Flights@v1" in rows["agent-sgd_Flights"]
    assert "0.90 [0.80, 0.97]" in rows["agent-sgd_Flights"] and "evaluate" in rows["agent-sgd_Flights"]
    assert "teacher" in rows["agent-sgd_Hotels"] and "waiting for traffic" in rows["agent-sgd_Hotels"]
    assert "200 train records" in rows["agent-sgd_Hotels"]
    svgs = browser.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(svgs) == 4 and browser.find_elements(By.CSS_SELECTOR, "svg.drift circle")
    assert browser.find_elements(By.CSS_SELECTOR, "svg.versions circle")

    mine = httpx.get(f"{app.base}/status.json", headers={"Authorization": f"Bearer {app.globex}"}, timeout=30)
    assert mine.status_code == 200 and [r["agent"] for r in mine.json()["data"]] == ["sgd_Hotels"]
    assert httpx.get(f"{app.base}/status.json", timeout=30).status_code == 401
    assert httpx.get(f"{app.base}/status", timeout=30).status_code == 401  # the sign-in page
