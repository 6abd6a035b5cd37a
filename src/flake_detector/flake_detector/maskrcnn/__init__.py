"""Mask R-CNN flake detector (Masubuchi et al. (2020)) with the soft-label RPN of Nguyen et al. (2022).

Importing this package registers the ``maskrcnn`` detector backend.
"""

from flake_detector.maskrcnn import infer as _infer  # noqa: F401  (registers the backend)
