"""``python -m napari_register.training ...`` (what ``torchrun`` starts): the same as ``napari-register train``."""
from . import build_parser
from .loop import train

train(build_parser().parse_args())
