"""`from models.modeling_xvla import XVLA`, as the X-VLA BEHAVIOR checkpoints' usage is written."""

from models.xvla.model import XVLA

__all__ = ["XVLA"]
