"""The service on Ray Serve: the same FastAPI app (``service.app.create_app``) as the ingress
of a Serve deployment, so every replica runs the same routes, middleware, batcher, runtime
and scoring as ``conceptguard serve``. Nothing here re-implements a route.

Start it with ``conceptguard serve --engine ray`` or ``serve run deploy/ray/serve_config.yaml``
(import path ``service.ray_serve:app``). The service settings are the usual
``CONCEPTGUARD_*`` variables; they reach every replica through the deployment's
``runtime_env`` (read before the replica imports the app, as ``PROMETHEUS_MULTIPROC_DIR``
must be). The Ray-only knobs:

- ``CONCEPTGUARD_RAY_MIN_REPLICAS`` (1), ``CONCEPTGUARD_RAY_MAX_REPLICAS`` (1): autoscaling
  bounds (1 and 1: one fixed replica);
- ``CONCEPTGUARD_RAY_TARGET_ONGOING_REQUESTS`` (16): Serve adds replicas above this many
  in-flight requests per replica;
- ``CONCEPTGUARD_RAY_MAX_ONGOING_REQUESTS`` (64): requests a replica accepts at once (at
  least the batch size, or batches never fill);
- ``CONCEPTGUARD_RAY_NUM_CPUS`` (1): CPUs reserved per replica.

Bank reload: with ``CONCEPTGUARD_STATE_DIR`` set to a folder every replica sees (one node:
any local folder; several nodes: a shared volume), ``POST /v1/bank/reload`` on any replica
writes the bank pointer, every replica follows it, and the reload answers once all of them
serve the new bank (``service.lifecycle.SharedBank``, the same mechanism as ``--workers N``;
replicas are named by host and pid, so several nodes sharing the folder stay apart). Every
response carries ``x-conceptguard-replica`` (Serve's replica id): ``tests/test_ray_serve.py``
uses it to see that requests reaching each replica serve the reloaded bank.

Metrics: the app's ``/metrics`` answers for the replica the proxy picks; with one
``PROMETHEUS_MULTIPROC_DIR`` per node (the RayService: an ``emptyDir`` per pod) it answers
the node's sum. Scrape each worker node's proxy (it prefers its own node's replicas), plus
Ray's own metrics export; see deploy/README.md, "Ray". The gRPC server is off by default
here (``CONCEPTGUARD_GRPC_PORT=0``): replicas on one node would race for the port.

``deploy/ray/serve_config.yaml`` (the RayService's ``serveConfigV2`` as well) names no
paths; ``args`` other than ``env`` and the :class:`RaySettings` fields are refused.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

RAY_ENV_PREFIX = "CONCEPTGUARD_RAY_"
REPLICA_HEADER = "x-conceptguard-replica"
# the variables a replica needs from the process that deploys it
_FORWARDED_PREFIXES = ("CONCEPTGUARD_", "PROMETHEUS_MULTIPROC_DIR", "HF_", "OMP_",
                       "MKL_", "OPENBLAS_")


class RaySettings(BaseSettings):
    """Deployment options of the Ray Serve engine (``CONCEPTGUARD_RAY_*``)."""

    model_config = SettingsConfigDict(env_prefix=RAY_ENV_PREFIX, extra="ignore")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(1.0, gt=0)

    def autoscaling_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas,
                "max_replicas": max(self.max_replicas, self.min_replicas, 1),
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests}


def replica_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a replica is started with: the service's variables of ``environ``
    (default: this process), gRPC off unless set."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k.startswith(_FORWARDED_PREFIXES)}
    env.setdefault("CONCEPTGUARD_GRPC_PORT", "0")
    return env


class ReplicaHeader:
    """ASGI middleware: every response names the Serve replica that answered
    (``x-conceptguard-replica: <replica id>``, Ray Serve's replica id), so that a client, a
    test or an operator can tell the replicas behind the one proxy apart."""

    def __init__(self, app: Any):
        self.app = app
        self._value: bytes | None = None

    def _replica(self) -> bytes:
        if self._value is None:
            from ray import serve

            try:
                self._value = serve.get_replica_context().replica_id.unique_id.encode()
            except Exception:  # outside a replica (a plain uvicorn run): no header
                self._value = b""
        return self._value

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._replica():
            await self.app(scope, receive, send)
            return
        value = self._replica()

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER.encode(), value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build(args: dict[str, Any] | None = None) -> Any:
    """A Serve application (for ``serve.run``; ``serve run`` calls it with the config's
    ``args``). ``args`` may hold ``env`` (extra variables for the replicas) and any
    :class:`RaySettings` field; the rest comes from the environment."""
    from ray import serve

    from service.app import create_app

    args = dict(args or {})
    unknown = sorted(set(args) - set(RaySettings.model_fields) - {"env"})
    if unknown:  # a misspelt knob would otherwise be ignored silently
        raise ValueError(f"unknown args {unknown}: expected env and "
                         f"{sorted(RaySettings.model_fields)}")
    extra_env = {str(k): str(v) for k, v in (args.pop("env", None) or {}).items()}
    env = replica_env({**os.environ, **extra_env})
    rs = RaySettings(**args)
    fastapi_app = create_app()  # settings are read in the replica, at its startup
    fastapi_app.add_middleware(ReplicaHeader)

    @serve.deployment(
        name="conceptguard",
        autoscaling_config=rs.autoscaling_config(),
        max_ongoing_requests=rs.max_ongoing_requests,
        ray_actor_options={"num_cpus": rs.num_cpus, "runtime_env": {"env_vars": env}},
        health_check_period_s=10,
    )
    @serve.ingress(fastapi_app)
    class ConceptGuard:
        """One replica: the app's lifespan loads the bank (ready at /v2/health/ready)."""

    return ConceptGuard.bind()


def app(args: dict[str, Any] | None = None) -> Any:
    """The application builder named in ``deploy/ray/serve_config.yaml``."""
    return build(args)
