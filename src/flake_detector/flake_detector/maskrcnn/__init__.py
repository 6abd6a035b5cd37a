"""Mask R-CNN flake detector (seed 001) with the soft-label RPN of seed 002.

Importing this package registers the ``maskrcnn`` detector backend.
"""

from flake_detector.maskrcnn import infer as _infer  # noqa: F401  (registers the backend)
