"""``GET /instance/previews?model_id=...``: placement plans as JSON (exo's endpoint name)."""

from __future__ import annotations

from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError, bad_request


class PreviewsHandler(ApiHandler):
    """Plans for a model on the server's cluster (or, without one, on this machine)."""

    def initialize(self, registry, topology_source=None) -> None:
        super().initialize(registry)
        self.topology_source = topology_source

    def _int(self, name: str, default: int, minimum: int = 1) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise bad_request(f"'{name}' must be an integer, got {raw!r}.", name) from None
        if value < minimum:
            raise bad_request(f"'{name}' must be at least {minimum}.", name)
        return value

    async def get(self) -> None:
        from exo_lab.models import ModelNotFoundError
        from exo_lab.placement.preview import preview, this_machine

        try:
            model = self.get_query_argument("model_id", None)
            if not model:
                raise bad_request(
                    "Missing required query parameter: 'model_id'.", "model_id", "missing_required_parameter"
                )
            context = self._int("context", 4096)
            prompt = self._int("prompt_tokens", min(512, context))
            batch = self._int("batch", 1)
            objective = self.get_query_argument("objective", "decode")
            if objective not in ("decode", "ttft"):
                raise bad_request("'objective' must be 'decode' or 'ttft'.", "objective")
            if prompt > context:
                raise bad_request("'prompt_tokens' must not exceed 'context'.", "prompt_tokens")
            if model in self.registry.names():  # a served model: plan for its files
                model = self.registry.get(model).path or model
            topology = self.topology_source() if self.topology_source else this_machine()
            try:
                plans = preview(topology, model, context, prompt, batch, objective)
            except ModelNotFoundError as exc:
                raise ApiError(404, str(exc), param="model_id", code="model_not_found") from exc
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(plans.to_json())
