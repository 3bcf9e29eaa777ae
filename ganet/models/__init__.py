from ganet.models._registry import ModelInfo, create_model, list_models, model_info, register_model
from ganet.models import relnet, shufflenet_v1, shufflenet_v2  # noqa: F401  (registers the models)

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
