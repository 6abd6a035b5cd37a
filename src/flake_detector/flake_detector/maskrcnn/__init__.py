"""Mask R-CNN flake detector (seed 001) with the soft-label RPN of seed 002.

Importing this package registers the ``maskrcnn`` detector backend.
"""
