"""GroupViT: semantic segmentation emerges from text supervision (CVPR 2022), as a library.

The package is pure: models, losses, data transforms and evaluation; no orchestration (that lives in `pipelines/`).
"""
__version__ = "0.1.0"
