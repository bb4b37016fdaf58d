"""fastmbv1: how fast can a MobileNetV1 learn CIFAR-10, and where does the time go?"""

from fastmbv1.checkpoint import load

__all__ = ["load"]
__version__ = "0.1.0"
