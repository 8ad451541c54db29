"""The dataset card: one page per curated version, `card.md` and `class_balance.png` next to `manifest.json`.

    flywheel curate --agents sgd_Flights      (the pipeline writes the card into the staging folder before publish)
    cat $FLYWHEEL_HOME/datasets/sgd_Flights/LATEST   # then open datasets/sgd_Flights/<version>/card.md

Everything on the card comes from the manifest (`render` is a pure function of it): counts per stage and reason,
the class balance per split (train / validation / test: a table and a stacked bar chart), PII entities redacted,
lineage and the config. The plot is
drawn with matplotlib's object API on the Agg canvas (headless, no global pyplot state).
"""

from __future__ import annotations

import io
import json
from typing import Any

from flywheel.datasets import SPLITS
from flywheel.storage import Store

CARD = "card.md"
PLOT = "class_balance.png"
MAX_PLOT_LABELS = 30  # the most frequent labels; the table lists them all
COLOURS = {"train": "#4C72B0", "validation": "#55A868", "test": "#DD8452"}


def write_card(store: Store, folder: str, manifest: dict[str, Any]) -> list[str]:
    """Write `card.md` and `class_balance.png` under `folder` (relative to the home). Returns the names written."""
    png = class_balance_png(manifest["labels"], f"{manifest['agent']} {manifest['version']}")
    written = []
    if png is not None:
        store.write_bytes(f"{folder}/{PLOT}", png)
        written.append(PLOT)
    store.write_bytes(f"{folder}/{CARD}", render(manifest, plot=PLOT if png is not None else None).encode())
    return [CARD, *written]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render(manifest: dict[str, Any], plot: str | None = PLOT) -> str:
    """The card's Markdown from a manifest."""
    m, c, st, lin = manifest, manifest["counts"], manifest.get("stages", {}), manifest.get("lineage", {})
    lines = [f"# Dataset card: `{m['agent']}` version `{m['version']}`", "",
             f"Task: **{m['task']}**. {c['kept']} examples ({_split_counts(c)}) from {c['in']} log records; "
             f"{c['quarantined']} set aside with a reason. Previous version: `{lin.get('previous') or 'none'}` "
             f"({'incremental' if lin.get('incremental') else 'full build'}).", ""]

    lines += ["## Counts by stage", ""]
    ing, prev, clean, decide = (st.get(k, {}) for k in ("ingest", "previous", "clean", "decide"))
    rows = []
    if ing:
        rows.append(["ingest: lines naming this agent (all time)", "", "", ing.get("quarantined", 0)])
        if ing.get("unattributed"):
            rows.append(["ingest: lines naming no agent (the whole log store)", "", "", ing["unattributed"]])
    if prev.get("in"):
        rows.append([f"carried from `{prev.get('version')}`", prev["in"], prev.get("kept", 0),
                     prev["in"] - prev.get("kept", 0)])
    if clean:
        rows.append(["clean: validate, quality, PII (new records)", clean["in"], clean["out"],
                     clean["in"] - clean["out"]])
    if decide:
        rows.append(["decide: review, feedback, duplicates, near-duplicates, cap", decide["in"], decide["out"],
                     decide["in"] - decide["out"]])
    rows.append(["split (by session, stratified by label)", c["kept"], _split_counts(c, " / "), ""])
    lines += _table(["stage", "in", "out", "set aside"], rows) + [""]

    reason_rows = [[stage, reason, n] for stage, part in (("ingest", ing), ("clean", clean), ("decide", decide))
                   for reason, n in sorted(part.get("reasons", {}).items())]
    lines += ["## Set aside, by reason", ""]
    lines += (_table(["stage", "reason", "records"], reason_rows) if reason_rows else ["Nothing was set aside."])
    lines += ["", f"All reasons in this version (carried ones included): `{json.dumps(m['reasons'], sort_keys=True)}`",
              ""]

    per = {s: m["labels"].get(s, {}) for s in SPLITS}
    labels = _by_total(per)
    total = max(c["kept"], 1)
    lines += ["## Class balance", ""]
    lines += _table(["label", *SPLITS, "total", "share"],
                    [[f"`{lb}`", *(per[s].get(lb, 0) for s in SPLITS), n, f"{n / total:.1%}"]
                     for lb in labels for n in [sum(per[s].get(lb, 0) for s in SPLITS)]])
    lines += [""] + ([f"![class balance]({plot})", ""] if plot else ["(plot skipped: matplotlib is not installed)", ""])

    lines += ["## PII redacted (entities in kept examples)", ""]
    lines += (_table(["entity", "count"], [[k, v] for k, v in sorted(m.get("pii", {}).items())])
              if m.get("pii") else ["None found."])
    lines += ["", "## Lineage", ""]
    lines += _table(["", ""], [
        ["log records", lin.get("log_records", c["in"])],
        ["record ids digest", f"`{lin.get('record_ids_digest', '')}`"],
        ["log parts consumed", len(lin.get("parts", []))],
        ["log parts read by this run", len(lin.get("parts_read", []))],
        ["watermark (newest record timestamp)", lin.get("watermark")],
        ["review labels (decisions)", _review_cell(lin.get("review") or {})],
        ["sessions", ", ".join(f"{k}: {v}" for k, v in sorted(m.get("sessions", {}).items()))],
        ["run", f"`{m.get('run')}`"],
    ])
    lines += ["", "## Config", "", "```json", json.dumps(m.get("config", {}), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _split_counts(counts: dict[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{counts.get(s, 0)} {s}" for s in SPLITS)


def _by_total(per: dict[str, dict[str, int]]) -> list[str]:
    """Labels, the most examples (all splits) first."""
    names = set().union(*per.values())
    return sorted(names, key=lambda lb: (-sum(p.get(lb, 0) for p in per.values()), lb))


def _review_cell(review: dict[str, Any]) -> str:
    if not review.get("labels"):
        return "0"
    decisions = ", ".join(f"{k}: {v}" for k, v in sorted(review.get("decisions", {}).items()))
    return f"{review['labels']} ({decisions})"


def class_balance_png(labels: dict[str, dict[str, int]], title: str) -> bytes | None:
    """A horizontal stacked bar chart (train + validation + test per label) as PNG bytes; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    per = {s: labels.get(s, {}) for s in SPLITS}
    names = _by_total(per)
    shown = names[:MAX_PLOT_LABELS][::-1]  # the largest on top
    fig = Figure(figsize=(7, 1.2 + 0.3 * max(len(shown), 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    left = [0] * len(shown)
    for split in SPLITS:
        widths = [per[split].get(lb, 0) for lb in shown]
        ax.barh(shown, widths, left=left, label=split, color=COLOURS[split])
        left = [a + b for a, b in zip(left, widths)]
    more = f" (top {MAX_PLOT_LABELS} of {len(names)})" if len(names) > MAX_PLOT_LABELS else ""
    ax.set_title(f"Class balance: {title}{more}", fontsize=10)
    ax.set_xlabel("examples")
    ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
