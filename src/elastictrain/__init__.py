"""ElasticTrain + CUP reproduction engine.

Shipped models load with ``elastictrain.load_compressed(path)``: an ordinary ``nn.Module`` on the
CPU, in eval mode, taking [0, 1] inputs.
"""
from .models import create_model, list_models
from .storage import load_compressed, save_compressed

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_compressed", "save_compressed"]
