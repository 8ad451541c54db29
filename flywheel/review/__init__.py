"""Review: people in the loop. Feedback on answers, a queue of uncertain cases, decisions that become labels,
and the review and status pages the Serve app shows. Pure: no Ray, no FastAPI.

    feedback.py   record_feedback: thumbs up/down (+ a corrected answer) on a captured record of the caller's tenant
    queue.py      fill_queue (controller) -> items; approve / correct -> labels, written as a log part
    status.py     status_rows: backend, quality vs the teacher, cost, drift, retrains, last cycle per agent
    pages.py      review_page, status_page, login_page: HTML strings with inline CSS and SVG
    records.py    find_record(s), new_records: the log store reads the others share
    web.py        form and JSON bodies, the CSRF token, the same-origin check (for the Serve routes)

Served by `flywheel.serve.ingress`: POST /v1/feedback, GET /review, POST /review/<item>/approve|correct, GET /status,
GET /status.json.
"""

from flywheel.review.feedback import Forbidden, Invalid, NotFound, ReviewError, negative_records, record_feedback
from flywheel.review.queue import approve, correct, fill_queue, labels, list_items, superseded_records

__all__ = ["record_feedback", "negative_records", "fill_queue", "list_items", "approve", "correct", "labels",
           "superseded_records", "ReviewError", "Invalid", "Forbidden", "NotFound"]
