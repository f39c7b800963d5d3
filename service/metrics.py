"""Prometheus metrics of the service: the series (prefix ``conceptguard_``, base units,
bounded labels) and the per-request recording.

Label values come from the bank (model name, classes, concepts) and from fixed sets
(endpoint templates, status codes, error codes), never from request contents. The other
parts: :mod:`service.batch_metrics` records what a batch scored (per bank) and what the
queue did; :mod:`service.metrics_export` renders ``/metrics`` (several uvicorn workers
included) and creates the known label sets at 0.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Summary, disable_created_metrics

disable_created_metrics()

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(9))  # 1 .. 256
EMA_ALPHA = 0.01  # per input: the moving average spans roughly the last 100 inputs
REJECT_REASON_LABELS = {"misclassification-like": "misclassification_like",
                        "adversarial-like": "adversarial_like",
                        "unfamiliar": "unfamiliar"}

REQUESTS = Counter("conceptguard_requests", "HTTP requests by route template and status code",
                   ["endpoint", "status"])
REQUEST_DURATION = Histogram("conceptguard_request_duration_seconds",
                             "HTTP request duration by route template", ["endpoint"],
                             buckets=LATENCY_BUCKETS)
PREDICTIONS = Counter("conceptguard_predictions", "Scored inputs by predicted class and decision",
                      ["model", "class", "decision"])
REJECTIONS = Counter("conceptguard_rejections", "Rejected inputs by the kind of defect suspected",
                     ["model", "reason"])
PAPER_RULE_REJECTIONS = Counter("conceptguard_paper_rule_rejections",
                                "Inputs the paper's heatmap rule would reject", ["model"])
TRUST = Histogram("conceptguard_trust_score", "Calibrated trust score per input", ["model"],
                  buckets=SCORE_BUCKETS)
HEAD_SCORE = Histogram("conceptguard_head_score", "Defect-head probability per input",
                       ["model", "head"], buckets=SCORE_BUCKETS)
QUEUE_WAIT = Histogram("conceptguard_queue_wait_seconds",
                       "Time an image waited in the batch queue", buckets=LATENCY_BUCKETS)
INFERENCE_DURATION = Histogram("conceptguard_inference_duration_seconds",
                               "Runtime call plus scoring, per batch", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("conceptguard_batch_size", "Images per runtime call",
                       buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("conceptguard_queue_depth", "Images admitted and not yet answered",
                    multiprocess_mode="livesum")
CONCEPT_SCORE = Summary("conceptguard_concept_score",
                        "Standardised concept scores of served inputs (mean = sum / count)",
                        ["model", "concept"])
CONCEPT_SCORE_MEAN = Gauge("conceptguard_concept_score_mean",
                           f"Exponential moving average (alpha {EMA_ALPHA} per input) of the "
                           "standardised concept scores", ["model", "concept"],
                           multiprocess_mode="mostrecent")
CONCEPT_SCORE_PARTS = Counter(
    "conceptguard_concept_score_parts",
    "Sums of the positive parts (sign=positive) and of the magnitudes of the negative parts "
    "(sign=negative) of the standardised concept scores: both only grow, so the windowed mean "
    "is (rate(positive) - rate(negative)) / rate(conceptguard_concept_score_count)",
    ["model", "concept", "sign"])
TRUST_SUM = Counter("conceptguard_trust_sum",
                    "Sum of the trust scores (P(prediction is right)) by predicted class and "
                    "decision; divided by conceptguard_predictions_total it is the estimated "
                    "accuracy", ["model", "class", "decision"])
ESTIMATED_ACCURACY = Gauge("conceptguard_estimated_accuracy",
                           f"Exponential moving average (alpha {EMA_ALPHA} per input) of the "
                           "trust score, over all inputs or the accepted ones, per worker",
                           ["model", "inputs"], multiprocess_mode="mostrecent")
EXPECTED_REJECTION_RATE = Gauge("conceptguard_expected_rejection_rate",
                                "Fraction of clean test inputs the bank's threshold rejects "
                                "(1 - coverage in the bank's evaluation): the baseline of the "
                                "rejection-spike alert", ["model"], multiprocess_mode="max")
REJECT_THRESHOLD = Gauge("conceptguard_reject_threshold",
                         "The reject threshold in use, on the calibrated trust scale (reject "
                         "when trust < value); target: bank (the bank's own) or the operating "
                         "point's target, e.g. coverage:0.9 (CONCEPTGUARD_OPERATING_POINT or "
                         "PUT /v1/admin/operating-point), per worker",
                         ["model", "target"], multiprocess_mode="mostrecent")
QUEUE_CAPACITY = Gauge("conceptguard_queue_capacity",
                       "Most images the batching queue admits (CONCEPTGUARD_QUEUE_SIZE); "
                       "queue_depth / queue_capacity is the saturation",
                       multiprocess_mode="livesum")
FEEDBACK = Counter("conceptguard_feedback",
                   "Labels received through POST /v1/feedback, by the decision and reason "
                   "the service gave", ["model", "decision", "reason"])
FEEDBACK_CORRECT = Counter("conceptguard_feedback_correct",
                           "Labels received that match the predicted class, by the decision "
                           "and reason the service gave", ["model", "decision", "reason"])
SINK_EVENTS = Counter("conceptguard_sink_events",
                      "Inference-logger CloudEvents (POST /v1/events) by type (request / "
                      "response) and result: accepted (202), invalid (4xx), busy (503), and, "
                      "for requests, monitored or failed once scored", ["type", "result"])
SINK_PAIRS = Counter("conceptguard_sink_pairs",
                     "Request/response pairs of the inference-logger sink: inputs whose served "
                     "prediction agrees or disagrees with the bank classifier's, and events "
                     "that were unreadable, expired or evicted before their other half came",
                     ["result"])
BANK_INFO = Gauge("conceptguard_bank_info",
                  "The bank being served and the runtime serving it (value 1); provider: the "
                  "execution provider the session actually uses",
                  ["model", "bank_id", "vlm", "classifier_hash", "schema_version", "backend",
                   "device", "provider"],
                  multiprocess_mode="liveall")
BAD_REQUESTS = Counter("conceptguard_bad_requests", "Client errors (4xx) by error code",
                       ["code"])
QUEUE_FULL = Counter("conceptguard_queue_full", "Requests refused because the queue was full")
BANK_RELOADS = Counter("conceptguard_bank_reloads", "Bank reloads by result", ["result"])

# (decision, reason) label pairs of the feedback counters
FEEDBACK_LABELS = (("accept", "accepted"),
                   *(("reject", label) for label in REJECT_REASON_LABELS.values()))
# Every error code the service answers with (the label set of bad_requests_total).
ERROR_CODES = ("empty", "not_an_image", "corrupt", "invalid_base64", "invalid_json", "no_file",
               "invalid_multipart", "unauthorized", "forbidden", "reload_disabled",
               "not_found", "unknown_model", "unknown_version", "method_not_allowed",
               "timeout", "too_large", "too_many_pixels", "too_many_images",
               "unsupported_mode", "unsupported_format", "unsupported_media_type",
               "invalid_request", "invalid_tensor", "invalid_bank", "http_error",
               "invalid_event", "no_operating_curve", "unreachable_target", "client_closed")
# Statuses pre-created for every route (others appear when first answered).
INITIAL_STATUSES = ("200", "400", "401", "403", "404", "408", "413", "415", "422", "500",
                    "503")


SINK_RESULTS = ("accepted", "invalid", "busy", "monitored", "failed")
SINK_PAIR_RESULTS = ("agree", "disagree", "unreadable", "expired", "evicted")


def set_queue_capacity(capacity: int) -> None:
    QUEUE_CAPACITY.set(capacity)


def feedback(model: str, decision: str, reason: str, correct: bool) -> None:
    """One label received: ``reason`` is a REJECT_REASON_LABELS value or ``accepted``."""
    FEEDBACK.labels(model, decision, reason).inc()
    child = FEEDBACK_CORRECT.labels(model, decision, reason)
    child.inc(1 if correct else 0)  # created at 0 with its first label, so rate() sees it


def observe_request(endpoint: str, status: int, seconds: float) -> None:
    REQUESTS.labels(endpoint, str(status)).inc()
    REQUEST_DURATION.labels(endpoint).observe(seconds)


def bad_request(code: str) -> None:
    BAD_REQUESTS.labels(code).inc()


def reload_result(ok: bool) -> None:
    BANK_RELOADS.labels("success" if ok else "failure").inc()
