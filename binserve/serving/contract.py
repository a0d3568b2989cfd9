"""What the HTTP layer needs of the model manager, of a served model and of its adapter.

design: the routes (`binserve/api`) see the serving state only through these protocols, so they
import neither the manager nor the adapters, and with them neither torch nor transformers (which
a worker loads in `bootstrap`, after Gunicorn forked it). `serving.manager.ModelManager` and its
`LoadedModel`, the adapters of `models/`, and the in-process HTTP tests' fake manager are all
checked against them (tests/unit/test_contracts.py), so the seam is declared, not a convention.
"""

from __future__ import annotations

from typing import Protocol

from binserve.scheduling.contract import GenerationScheduler, Scheduler
from binserve.scheduling.sequences import SamplingParams
from models.contract import TensorSpec, Validated


class AdapterView(Protocol):
    """A loaded model version as a route uses it: describe it, check a request, shape a reply."""

    name: str
    version: str
    adapter_name: str
    generates: bool
    #: samples are token rows (their lengths are what token quotas count)
    token_inputs: bool

    def input_tensors(self) -> list[TensorSpec]:
        """The named inputs a request may carry, per sample."""

    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        """Check a decoded request and turn it into samples (400/413 on bad input)."""

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        """One request's reply from its per-sample outputs."""


class GenerativeView(AdapterView, Protocol):
    """A generative model's adapter, as the generation routes use it."""

    #: the most new tokens one request may ask for
    max_new_tokens: int

    def sampling(self, values: dict) -> SamplingParams:
        """Sampling settings from request values, each checked."""

    def check_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """A prompt within the vocabulary and the context."""

    def chat_prompt(self, messages) -> list[int]:
        """Token ids of chat messages under the model's chat template."""

    def text_prompt(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt."""

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs)."""


class ServedModel(Protocol):
    """One served model: its current version's adapter and outputs, and its scheduler."""

    name: str
    scheduler: Scheduler | GenerationScheduler

    @property
    def adapter(self) -> AdapterView:
        """The served version's adapter."""

    @property
    def signature(self) -> dict:
        """The served version's outputs: key -> (per-sample shape, dtype)."""

    @property
    def cacheable(self) -> bool:
        """Whether the served version's replies may be answered from the response cache."""


class VersionsView(Protocol):
    """What a route asks of the model repository: which versions of a model exist."""

    def versions(self, model: str) -> list[str]:
        """Versions on disk, oldest first."""


class ModelHost(Protocol):
    """The model manager as the routes use it."""

    #: the models this worker should serve now
    names: list[str]
    default_name: str
    #: set on SIGTERM: readiness says 503 while accepted requests finish
    draining: bool
    repo: VersionsView

    @property
    def ready(self) -> bool:
        """Every model this worker should serve is loaded and warm."""

    def get(self, name: str | None) -> ServedModel:
        """The served model `name` (None: the default); 404 unknown, 503 loading."""

    def served(self) -> list[ServedModel]:
        """The models served now."""

    def describe(self) -> list[dict]:
        """GET /models: each served model's description."""

    def workers_ready(self) -> bool:
        """Every worker of this server serves every model."""

    def not_ready_reasons(self) -> dict[str, str]:
        """Why each model that is not loaded is not."""

    def loading(self) -> dict[str, dict]:
        """The models this worker is loading now (version, seconds so far) or has yet to load."""

    def update(
        self, name: str, *, version: str | None, path: str | None, adapter: str | None, timeout_s: float
    ) -> dict:
        """POST /update_model: make a version current and wait for every worker."""

    def start_draining(self) -> None:
        """The worker is shutting down."""

    def close(self) -> None:
        """Finish queued work and stop."""
