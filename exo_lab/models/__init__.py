"""Models: synthetic models, the model store and the model card."""

from exo_lab.models.card import ModelCard
from exo_lab.models.store import DEMO_MODEL, ModelNotFoundError, list_cached, resolve

__all__ = ["DEMO_MODEL", "ModelCard", "ModelNotFoundError", "list_cached", "resolve"]
