"""The review and status pages as plain HTML strings: no template engine, no script or font from elsewhere.

    review_page(items, tenant, csrf)   GET /review: open items, each with an approve form and a correct form
    status_page(rows)                  GET /status: per agent backend, quality vs the teacher, cost, drift, cycles
    login_page(message)                GET /review without a key: a form that posts the key once (a cookie keeps it)

Every value from the store or a request goes through `html.escape`. Plots are inline SVG drawn here. The forms
post to the Serve app (`/review/<item_id>/approve`, `/review/<item_id>/correct`, `/review/login`) with a CSRF
token the app checks; the answer is edited as JSON (an OpenAI assistant message).
"""

from __future__ import annotations

import html
import json
import time
from typing import Any, Sequence

from flywheel.review.queue import openai_view

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header a{color:#9fc3ff}main{padding:16px 24px;max-width:1200px}
h1{font-size:18px;margin:0}h2{font-size:16px;margin:0 0 6px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px;margin:0 0 14px}
.tag{display:inline-block;border-radius:3px;padding:0 6px;font-size:12px;background:#e8ecf3;margin-right:6px}
.tag.bad{background:#fde2e1;color:#8a1c14}.tag.ok{background:#ddf3e4;color:#11652f}
.tag.warn{background:#fff1cc;color:#7a5200}
.muted{color:#6b7385;font-size:12px}pre{background:#f3f5f8;padding:8px;overflow:auto;margin:4px 0;white-space:pre-wrap}
.turn{margin:2px 0}.role{font-weight:600;display:inline-block;min-width:70px}
textarea{width:100%;min-height:120px;font:12px ui-monospace,monospace}
button{background:#2458d6;color:#fff;border:0;border-radius:4px;padding:6px 12px;cursor:pointer}
button.secondary{background:#5b6475}form{display:inline-block;margin:6px 8px 0 0;vertical-align:top}
form.correct{display:block}table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e3e6ec;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600}.plots{display:flex;gap:16px;flex-wrap:wrap}.notice{color:#11652f}
.error{color:#8a1c14}
"""
REASON_TAGS = {"negative_feedback": "bad", "invalid_tool_call": "bad", "guardrail": "bad",
               "teacher_disagreement": "warn", "low_confidence": "warn"}


def e(value: Any) -> str:
    """Escaped text of any value (None -> "-")."""
    return "-" if value is None else html.escape(str(value), quote=True)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _num(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _money(x: Any) -> str:
    return f"${x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def layout(title: str, body: str, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>{refresh}'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<header><h1>Flywheel</h1><a href="/review">review</a><a href="/status">status</a></header>'
            f'<main>{body}</main></body></html>')


# -- review ---------------------------------------------------------------------------------------------------
def _message_html(m: dict | None) -> str:
    if not m:
        return '<div class="turn muted">(no message)</div>'
    parts = [f'<span class="role">{e(m.get("role"))}</span>']
    if m.get("content"):
        parts.append(e(m["content"]))
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function") or {}
        parts.append(f'<code>{e(fn.get("name"))}({e(fn.get("arguments"))})</code>')
    return f'<div class="turn">{" ".join(parts)}</div>'


def _editable(m: dict | None) -> dict:
    """The answer as the reviewer edits it: tool-call arguments as JSON objects, not JSON text in a string."""
    if not m:
        return {"role": "assistant", "content": ""}
    calls = []
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = fn.get("arguments")
        calls.append({"type": "function", "function": {"name": fn.get("name"), "arguments": args}})
    return {"role": "assistant", "tool_calls": calls} if calls else {"role": "assistant", "content": m.get("content")}


def _item_html(item: dict, csrf: str) -> str:
    view = openai_view(item)
    iid = e(item["item_id"])
    tools = ", ".join(e((t.get("function") or {}).get("name")) for t in view["tools"] if isinstance(t, dict))
    editable = _editable(view["suggested"] or view["answer"])
    other = ""
    if view["other"]:
        other = f'<div><b>{e(view["other"]["model"])} answered:</b>{_message_html(view["other"]["answer"])}</div>'
    suggested = (f'<div><b>The user suggested:</b>{_message_html(view["suggested"])}</div>'
                 if view["suggested"] else "")
    token = f'<input type="hidden" name="csrf" value="{e(csrf)}">'
    return (f'<div class="card item" id="item-{iid}" data-item="{iid}">'
            f'<h2><span class="tag {REASON_TAGS.get(item.get("reason"), "")}">{e(item.get("reason"))}</span>'
            f'{e(item.get("agent"))}</h2>'
            f'<div class="muted">{e(item.get("detail"))}</div>'
            f'<div class="muted">record {e(item.get("record_id"))} · answered by {e(item.get("model"))} · tenant '
            f'{e(item.get("tenant"))} · queued {e(_when(item.get("created")))} · tools: {tools or "-"}</div>'
            f'<div><b>Request</b>{"".join(_message_html(m) for m in view["messages"])}</div>'
            f'<div><b>Answer</b>{_message_html(view["answer"])}</div>{other}{suggested}'
            f'<form class="approve" method="post" action="/review/{iid}/approve">{token}'
            f'<button type="submit" name="approve">Approve the answer</button></form>'
            f'<form class="correct" method="post" action="/review/{iid}/correct">{token}'
            f'<label class="muted">Correct answer (an OpenAI assistant message, JSON: "content" or '
            f'"tool_calls")</label><textarea name="message" spellcheck="false">'
            f'{e(json.dumps(editable, indent=2, ensure_ascii=False))}</textarea>'
            f'<button type="submit" class="secondary" name="correct">Save the correction</button></form></div>')


def review_page(items: Sequence[dict], tenant: str | None, csrf: str = "", notice: str = "", error: str = "",
                limit: int = 200) -> str:
    """The open review items (oldest first, at most `limit`) with approve and correct forms."""
    who = f"tenant {e(tenant)}" if tenant else "open mode (no API keys): every agent"
    head = (f'<div class="card"><h2>Review queue</h2><div class="muted">{who} · {len(items)} open item(s)'
            f'{f" (showing {limit})" if len(items) > limit else ""}</div>'
            + (f'<p class="notice" id="notice">{e(notice)}</p>' if notice else "")
            + (f'<p class="error" id="error">{e(error)}</p>' if error else "") + "</div>")
    body = "".join(_item_html(i, csrf) for i in items[:limit]) or '<p class="muted" id="empty">Nothing to review.</p>'
    return layout("Flywheel review", head + body)


def login_page(message: str = "", next_path: str = "/review") -> str:
    return layout("Flywheel sign in", (
        f'<div class="card"><h2>Sign in</h2><p class="muted">{e(message) or "Paste your API key."}</p>'
        f'<form method="post" action="/review/login"><input type="hidden" name="next" value="{e(next_path)}">'
        f'<input type="password" name="key" placeholder="fw_..." size="60" autocomplete="off"> '
        f'<button type="submit">Sign in</button></form></div>'))


# -- plots ----------------------------------------------------------------------------------------------------
def line_plot(points: Sequence[tuple[float, float]], title: str, labels: Sequence[str] | None = None,
              intervals: Sequence[tuple[float, float] | None] | None = None, hline: float | None = None,
              hline_label: str = "", width: int = 380, height: int = 170, css_class: str = "plot",
              ends_only: bool = False, marks: Sequence[bool] | None = None) -> str:
    """An inline SVG line plot of y in [0, 1] (points in x order), optional error bars and a horizontal line.

    `labels` name the points on the x axis (all of them, or with `ends_only` / more than 12 the first and last);
    `marks` draws the marked points in red (drifted windows)."""
    left, right, top, bottom = 34, 10, 22, 26
    w, h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="{e(css_class)}" width="{width}" height="{height}" '
           f'role="img" aria-label="{e(title)}"><title>{e(title)}</title>'
           f'<text x="{left}" y="14" font-size="12" font-weight="600">{e(title)}</text>'
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" stroke="#ccd2dc"/>']
    for tick in (0.0, 0.5, 1.0):
        y = top + h * (1 - tick)
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:.1f}</text>'
                   f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eef0f4"/>')
    if hline is not None:
        y = top + h * (1 - min(1.0, max(0.0, hline)))
        out.append(f'<line class="hline" x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b" '
                   f'stroke-dasharray="4 3"/><text x="{left + w - 2}" y="{y - 3:.1f}" font-size="10" '
                   f'text-anchor="end" fill="#c0392b">{e(hline_label)}</text>')
    if not points:
        out.append(f'<text x="{left + w / 2}" y="{top + h / 2}" font-size="11" text-anchor="middle" '
                   f'fill="#6b7385">no data yet</text></svg>')
        return "".join(out)
    xs = [p[0] for p in points]
    lo, hi = min(xs), max(xs)

    def sx(x: float) -> float:
        return left + (w / 2 if hi == lo else (x - lo) / (hi - lo) * w)

    def sy(y: float) -> float:
        return top + h * (1 - min(1.0, max(0.0, y)))

    coords = [(sx(x), sy(y)) for x, y in points]
    for i, ci in enumerate(intervals or []):
        if ci is not None:
            out.append(f'<line class="ci" x1="{coords[i][0]:.1f}" x2="{coords[i][0]:.1f}" y1="{sy(ci[0]):.1f}" '
                       f'y2="{sy(ci[1]):.1f}" stroke="#7d8db0" stroke-width="2"/>')
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    out.append(f'<polyline points="{path}" fill="none" stroke="#2458d6" stroke-width="1.5"/>')
    for i, ((x, y), (_, v)) in enumerate(zip(coords, points)):
        marked = bool(marks and marks[i])
        radius, color, note = (4, "#c0392b", " (drift)") if marked else (3, "#2458d6", "")
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{color}"><title>{v:.3f}{note}</title>'
                   f'</circle>')
    labels = list(labels or [])
    ends = (ends_only or len(labels) > 12) and len(labels) > 1  # the first and last label, inside the frame
    for i in sorted({0, len(labels) - 1}) if ends else range(len(labels)):
        anchor = ("start" if i == 0 else "end") if ends else "middle"
        out.append(f'<text x="{coords[i][0]:.1f}" y="{top + h + 14}" font-size="10" '
                   f'text-anchor="{anchor}">{e(labels[i])}</text>')
    out.append("</svg>")
    return "".join(out)


def drift_plot(row: dict) -> str:
    series = row["drift"]["series"]
    labels = [time.strftime("%m-%d %H:%M", time.gmtime(p["at"])) for p in series]
    threshold = row["drift"].get("threshold")
    return line_plot([(p["at"], p["share"]) for p in series], f"{row['agent']}: drift share over time", labels,
                     hline=threshold, hline_label=f"threshold {_num(threshold)}" if threshold is not None else "",
                     css_class="plot drift", ends_only=True, marks=[bool(p.get("drifted")) for p in series])


def versions_plot(row: dict) -> str:
    scored = [v for v in row["versions"] if v.get("value") is not None]
    metric = next((v["metric"] for v in scored if v.get("metric")), "primary metric")
    teacher = (row.get("production") or {}).get("teacher")
    return line_plot([(i, v["value"]) for i, v in enumerate(scored)], f"{row['agent']}: {metric} by version",
                     [v["version"] for v in scored], [v.get("ci") for v in scored],
                     hline=teacher, hline_label="teacher", css_class="plot versions")


# -- status ---------------------------------------------------------------------------------------------------
def _quality_cell(q: dict | None) -> str:
    if not q:
        return '<span class="muted">no production adapter</span>'
    ci = q.get("ci")
    share = q.get("share_of_teacher")
    return (f'<b>{e(q["version"])}</b> {e(q.get("metric"))} {_num(q.get("value"))}'
            + (f' [{_num(ci[0])}, {_num(ci[1])}]' if ci else "")
            + f' vs teacher {_num(q.get("teacher"))}'
            + (f' ({share:.0%} of the teacher)' if isinstance(share, float) else "")
            + f'<div class="muted">n={e(q.get("n"))} · gate {"passed" if q.get("gate") else "-"}</div>')


def _cost_cell(c: dict | None) -> str:
    if not c:
        return '<span class="muted">-</span>'
    share = c.get("saved_share")
    return (f'{_money(c.get("saved_per_1k_usd"))} saved / 1k requests'
            + (f' ({share:.0%})' if isinstance(share, float) else "")
            + f'<div class="muted">student {_money(c.get("student_per_1k_usd"))} · teacher '
              f'{_money(c.get("teacher_per_1k_usd"))}</div>')


def _cycle_cell(row: dict) -> str:
    last = row.get("last_cycle")
    if not last:
        return '<span class="muted">no cycle yet</span>'
    status = str(last.get("status"))
    tag = "bad" if status in ("failed", "abandoned", "error") else "ok" if status in ("done", "ok", "promoted",
                                                                                     "passed") else ""
    detail = last.get("detail")
    detail = json.dumps(detail, default=str)[:160] if isinstance(detail, (dict, list)) else detail
    return (f'{e(last.get("step"))} <span class="tag {tag}">{e(status)}</span>'
            f'<div class="muted">{e(_when(last.get("at")))}: {e(detail)}</div>')


def _certificate_cell(cert: dict | None) -> str:
    """A selective route's certificate: threshold, target, delta and the coverage it certified."""
    if not cert or cert.get("threshold") is None:
        return ""
    return (f'<div class="muted certificate">threshold {_num(cert["threshold"])}: exact &ge; '
            f'{_num(cert.get("target"))} '
            f'w.p. &ge; {_num(1 - (cert.get("delta") or 0))}, coverage {_num(cert.get("coverage"))}</div>')


def _traffic_cell(t: dict | None) -> str:
    """Records the agent has, and what its learning curve forecasts for the goal."""
    if not t:
        return ""
    have = "-" if t.get("records") is None else f'{t["records"]:,}'
    forecast = "" if t.get("forecast") is None else (
        f' · goal {_num(t.get("goal"))} at ~{t["forecast"]:,.0f}'
        + (f' ({t["low"]:,.0f}-{t["high"]:,.0f})' if t.get("low") is not None else ""))
    tag = {"served": "ok", "waiting for traffic": "warn", "plateau": "bad", "failing": "bad"}.get(t["state"], "")
    return (f'<span class="tag {tag} traffic">{e(t["state"])}</span>'
            f'<div class="muted">{have} train records{e(forecast)}</div>')


def status_row_html(row: dict) -> str:
    route = row["route"]
    tag = "ok" if route["backend"] == "student" else "warn"
    drift = row["drift"]
    drift_tag = "bad" if drift["state"].startswith("drift") else "ok" if drift["state"] == "ok" else ""
    series = drift["series"]
    last_share = f' · last share {_num(series[-1]["share"])} ({e(_when(series[-1]["at"]))})' if series else ""
    retrain = "".join(f'<div class="muted">{e(q.get("reason"))}</div>' for q in row["retrain"])
    return (f'<tr class="agent" id="agent-{e(row["agent"])}"><td><b>{e(row["agent"])}</b></td>'
            f'<td><span class="tag {tag}">{e(route.get("mode") or route["backend"])}</span>'
            f'{e(route.get("model") or "")}'
            f'<div class="muted">{e(route.get("reason"))}</div>{_certificate_cell(route.get("certificate"))}</td>'
            f'<td>{_quality_cell(row.get("production"))}</td><td>{_cost_cell(row.get("cost"))}</td>'
            f'<td><span class="tag {drift_tag}">{e(drift["state"])}</span><div class="muted">'
            f'{len(drift["events"])} drift event(s){last_share}</div></td>'
            f'<td>{len(row["retrain"])} queued{retrain}</td><td>{_cycle_cell(row)}</td>'
            f'<td>{_traffic_cell(row.get("traffic"))}</td>'
            f'<td><a href="/review">{e(row.get("review_items", 0))} open</a></td></tr>')


def status_page(rows: Sequence[dict], refresh_s: int = 30) -> str:
    """One table row per agent and, below, its drift and quality plots (refreshes every `refresh_s`)."""
    head = ("<tr><th>agent</th><th>backend</th><th>production vs teacher (95% interval)</th><th>cost</th>"
            "<th>drift</th><th>retrain queue</th><th>last cycle</th><th>traffic</th><th>review</th></tr>")
    table = (f'<table id="agents">{head}{"".join(status_row_html(r) for r in rows)}</table>' if rows else
             '<p class="muted" id="empty">No agents visible to this key.</p>')
    plots = "".join(f'<div class="card" id="plots-{e(r["agent"])}"><div class="plots">{drift_plot(r)}'
                    f'{versions_plot(r)}</div></div>' for r in rows)
    return layout("Flywheel status", f'<div class="card"><h2>Status</h2>{table}</div>{plots}', refresh_s)
