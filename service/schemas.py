"""Request and response models at the HTTP boundary (v1 API and Open Inference Protocol v2).

Handlers build responses as plain dicts for speed; these models define and document them
(OpenAPI at ``/docs``) and validate the JSON bodies that FastAPI parses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

NonEmptyStr = Annotated[str, Field(min_length=1)]
Row = Annotated[list[StrictFloat], Field(min_length=1)]

# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. 'corrupt'")
    message: str = Field(description="what is wrong, for a person")


class ErrorResponse(BaseModel):
    """v1 error body."""

    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """Open Inference Protocol error body."""

    error: str


# ---------------------------------------------------------------- v1


class ClassifyJSONRequest(BaseModel):
    """JSON body of ``POST /v1/classify``: ``images`` (a batch) or ``image`` (one)."""

    model_config = ConfigDict(extra="forbid")

    images: list[NonEmptyStr] | None = Field(
        None, min_length=1, description="base64-encoded image files (PNG, JPEG, ...); a batch")
    image: NonEmptyStr | None = Field(None, description="one base64-encoded image file")


class Probability(BaseModel):
    label: str
    probability: float


class ConceptContribution(BaseModel):
    concept: str
    contribution: float = Field(
        description="signed share of sim_ok - sim_defect; negative = pulled toward the "
                    "defect profile")


class Reason(BaseModel):
    kind: Literal["accepted", "misclassification-like", "adversarial-like", "unfamiliar"] = Field(
        description="accepted, or why the input was rejected: misclassification-like (a "
                    "familiar input the classifier is unsure of), adversarial-like (looks "
                    "like a successful attack), unfamiliar (shifted/corrupted or foreign)")
    summary: str
    concepts: list[ConceptContribution]
    concepts_unavailable: str | None = Field(
        None, description="why no concepts are named: the bank's concept competence check "
                          "does not show that the VLM and aligner separate the predicted class")


class Heads(BaseModel):
    misclassification: float = Field(
        description="P(misclassified | a familiar input), from the confidence signals")
    anomaly: float = Field(0.0, description="P(a wrong prediction on an input that is not "
                                            "clean), the density head; trust = (1 - "
                                            "misclassification) (1 - anomaly)")
    adversarial: float = Field(description="P(a successful attack), from the kind head")
    unfamiliar: float = Field(0.0, description="P(corrupted/shifted or foreign input), from "
                                               "the kind head")


class BankRef(BaseModel):
    id: str
    name: str
    schema_version: int


class MonitorResult(BaseModel):
    """The monitor's verdict on one input."""

    label: str
    class_index: int
    probabilities: list[Probability] = Field(description="top-k classes, most probable first")
    trust: float = Field(ge=0.0, le=1.0, description="estimated probability that the "
                                                     "prediction is right")
    reject: bool = Field(description="trust below the bank's threshold")
    reason: Reason
    heads: Heads
    paper_rule_reject: bool = Field(description="the paper's rule: max(sim_bad, sim_adv) > "
                                                "sim_ok")
    receipt: str | None = Field(None, description="signed receipt of this input: send it "
                                                  "with the true label to POST /v1/feedback")


class ClassifyResponse(MonitorResult):
    """One image (multipart field ``file``, a raw image body, or JSON ``image``)."""

    bank: BankRef
    latency_ms: float
    request_id: str | None = Field(None, description="the request id (also the "
                                                     "x-request-id header)")


class BatchResponse(BaseModel):
    """Several images (multipart ``files``, JSON ``images``) or sidecar rows."""

    results: list[MonitorResult]
    bank: BankRef
    latency_ms: float
    request_id: str | None = Field(None, description="the request id (also the "
                                                     "x-request-id header)")


class MonitorRequest(BaseModel):
    """Sidecar mode: the classifier already ran; send its features (and logits)."""

    model_config = ConfigDict(extra="forbid")

    features: list[Row] = Field(min_length=1,
                                description="penultimate-layer features, shape [N, d]")
    logits: list[Row] | None = Field(
        None, min_length=1,
        description="logits, shape [N, C]; computed with the classifier's head if absent")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="bank folder relative to the banks root "
                                         "(CONCEPTGUARD_BANKS_ROOT); default: the current one")


class ReloadWorkers(BaseModel):
    generation: int | None = Field(description="bank pointer generation (several workers)")
    workers: int = Field(description="live workers")
    serving: int = Field(description="workers serving the reloaded bank")
    failed: int = Field(description="workers that could not load it (they keep the old one)")
    all_serving: bool


class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    bank: BankRef
    previous: BankRef | None
    path: str = Field(description="the bank folder relative to the banks root")
    workers: ReloadWorkers


class BankSummary(BaseModel):
    id: str
    name: str
    model_name: str
    created_at: str
    schema_version: int
    path: str
    classes: list[str]
    concepts: list[str]
    vlm: dict[str, Any]
    classifier: dict[str, Any]
    threshold: dict[str, Any]
    evaluation: dict[str, Any]
    runtime: dict[str, Any]


# ---------------------------------------------------------------- v2 (Open Inference Protocol)


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # absent when parameters.binary_data_size is set


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # absent when parameters.binary_data_size is set


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool
