"""Models by name: the built-in builders (builders: MLPs, CNNs, torchvision nets, char models),
small GPTs (gpt) and Hugging Face adapters (hf); build_model builds and checks one on a real
first batch."""
from .builders import MODELS, build_model, mlp, num_parameters, resolve_model, small_cnn

__all__ = ["MODELS", "build_model", "mlp", "num_parameters", "resolve_model", "small_cnn"]
