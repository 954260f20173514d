"""Value heads (VIB and scalar) and the value model (backbone + head + auxiliary heads)."""
from .value_model import ValueModel, ValueOutput, hidden_size_of
from .vib_head import ScalarValueHead, VIBHeadOutput, VIBValueHead

__all__ = ["ValueModel", "ValueOutput", "hidden_size_of", "ScalarValueHead", "VIBHeadOutput", "VIBValueHead"]
