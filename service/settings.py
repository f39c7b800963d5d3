"""Service settings: one pydantic-settings object, read from ``CONCEPTGUARD_*`` variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CONCEPTGUARD_"


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the environment variable."""


class Settings(BaseSettings):
    """Every knob of the online service. Environment variables: ``CONCEPTGUARD_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      validate_default=True)

    bank: Path = Field(Path("banks/demo"), description="bank folder to serve")
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="inference runtime: ONNX Runtime or torch eager")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the classifier runs; auto = CUDA when available")
    threads: int = Field(1, ge=0, description="intra-op threads of the runtime per worker; "
                                               "0 = the runtime's default (one per core)")
    max_batch_size: int = Field(32, ge=1, le=4096,
                                description="most images per runtime call; 1 disables batching")
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0,
                               description="longest wait for a batch to fill, in milliseconds")
    adaptive_batching: bool = Field(
        True, description="dispatch a batch at once when no other admitted image is on its "
                          "way (max_wait_ms stays the upper bound); false: always wait up to "
                          "max_wait_ms for the batch to fill")
    inline_max_ms: float = Field(
        2.0, ge=0.0, le=1000.0,
        description="with adaptive batching, a request alone in the worker runs its one "
                    "image on the event loop's thread, without the hand-off to the inference "
                    "thread, while such runs take at most this many milliseconds; 0: always "
                    "the inference thread")
    queue_size: int = Field(512, ge=1, description="most images admitted and not yet answered")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1,
                                  description="largest request body (and image) in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1,
                                  description="largest decoded image, width x height")
    max_images_per_request: int = Field(64, ge=1, description="most images in one request")
    top_k: int = Field(5, ge=1, description="class probabilities returned per image (v1)")
    reason_concepts: int = Field(3, ge=0, description="concepts named in each reason (v1)")
    admin_token: SecretStr | None = Field(
        None, description="bearer token for POST /v1/bank/reload; unset = reload disabled")
    expected_classifier_hash: str | None = Field(
        None, description="refuse banks built for another classifier (sha256 hex)")
    model_name: str | None = Field(None, description="model name; default: the bank's name")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds on a 503")
    grpc_port: int = Field(8001, ge=0, le=65535,
                           description="Open Inference Protocol gRPC port; 0 = no gRPC server")
    grpc_host: str = Field("127.0.0.1", min_length=1,
                           description="address gRPC listens on (0.0.0.0: every interface)")
    banks_root: Path | None = Field(
        None, description="folder that every bank served or reloaded must lie under; "
                          "default: the parent folder of CONCEPTGUARD_BANK")
    decode_concurrency: int = Field(
        2, ge=1, le=64, description="images decoded at the same time per worker (bounds the "
                                    "decode memory: about 6 bytes x max_image_pixels each)")
    inline_decode_bytes: int = Field(
        128 * 1024, ge=0, description="images up to this many bytes are decoded by the batch "
                                      "worker (one thread hop); larger ones in the thread pool "
                                      "before they are queued; 0 = always the thread pool")
    access_log: bool = Field(False, description="log one line per request (uvicorn's access "
                                                "log); off by default")
    max_json_depth: int = Field(32, ge=2, le=512,
                                description="deepest nesting of arrays/objects in a JSON body")
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="longest time to receive a request's headers")
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait for the next chunk of a request body")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(
        512, ge=1, le=1_000_000,
        description="open connections per worker; at the cap the longest-idle one is closed")
    admission_hold_s: float = Field(
        5.0, ge=0, le=60,
        description="longest a request to a queued route on a keep-alive connection is held, "
                    "reading paused, while the worker is at capacity, before the ordinary "
                    "admission (503 if still full); 0 = never held")
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="HTTP/1.1 parser of `conceptguard serve`: httptools (C, less "
                                 "CPU per request) or h11 (pure Python); both run the "
                                 "connection guard")
    drain_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="on SIGTERM, longest wait for in-flight requests")
    feedback_key: SecretStr | None = Field(
        None, description="HMAC key of the feedback receipts (at least 16 characters); "
                          "unset: a random key kept in the state folder shared by the workers "
                          "(or in the process without one)")
    feedback_ttl_s: int = Field(86_400, ge=60, le=90 * 86_400,
                                description="receipts older than this are refused (404)")
    feedback_max_seen: int = Field(1_000_000, ge=1,
                                   description="most inputs whose label is remembered (to "
                                               "count each once) over one TTL")

    operating_point: str | None = Field(
        None, description="reject threshold chosen from the bank's stored operating curve: "
                          "coverage:V (accept at least V of the weighted fitting stream), "
                          "accept_correct:V (at least V of correct clean predictions) or "
                          "risk:V (error rate among accepted at most V); V in (0, 1); unset: "
                          "the bank's own threshold")

    @field_validator("admin_token", "expected_classifier_hash", "model_name", "banks_root",
                     "feedback_key", "operating_point", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("expected_classifier_hash")
    @classmethod
    def _hex_hash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a sha256 hex digest (64 hex characters)")
        return value

    @field_validator("operating_point")
    @classmethod
    def _operating_target(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from conceptguard.operating_point import OperatingTarget

        try:
            t = OperatingTarget.parse(value.strip())
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return f"{t.target}:{t.value:g}"

    @property
    def operating_target(self):
        """:attr:`operating_point` parsed (an ``OperatingTarget``), or None."""
        from conceptguard.operating_point import OperatingTarget

        return None if self.operating_point is None else OperatingTarget.parse(
            self.operating_point)

    @field_validator("feedback_key")
    @classmethod
    def _long_enough_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("model_name")
    @classmethod
    def _url_safe_name(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or value != value.strip()):
            raise ValueError("must not contain '/' or surrounding spaces (it is a URL segment)")
        return value

    @property
    def root(self) -> Path:
        """The banks root, resolved (every bank path must lie under it)."""
        root = self.banks_root if self.banks_root is not None else Path(self.bank).parent
        return Path(os.path.realpath(root))

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def reload_enabled(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (``overrides`` win); :class:`SettingsError` names a bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from exc


def describe_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        value = err.get("input")
        shown = "<hidden>" if field in ("admin_token", "feedback_key") else repr(value)
        lines.append(f"invalid setting {ENV_PREFIX}{field.upper()}={shown}: {err['msg']}")
    return "; ".join(lines)
