"""ganet: GA-ShuffleNet models, one checkpoint format, and the tools to train, export and serve them."""
from ganet.layers import GroupAttention
from ganet.models import create_model, list_models, model_info
from ganet.preprocess import Preprocessing

__version__ = "0.1.0"
__all__ = ["GroupAttention", "Preprocessing", "create_model", "list_models", "model_info"]
