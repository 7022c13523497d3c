"""The bottom-up-attention detector (Faster R-CNN, ResNet-101 C4, Visual Genome) that made
UNITER's region features, in plain PyTorch: weights loading (both public layouts), image
preprocessing, the network, and :class:`Extractor` (images in, UNITER image records out).
``python -m uniter_fast.extract`` writes them into UNITER's image db."""
from .config import PRESETS, DetectorConfig
from .extractor import Extractor
from .image import ImageError, load_image, prepare
from .model import BottomUpDetector
from .weights import WeightsError, load_detector, read_weights

__all__ = ["DetectorConfig", "PRESETS", "BottomUpDetector", "Extractor", "ImageError",
           "WeightsError", "load_detector", "read_weights", "load_image", "prepare"]
