"""The PASCAL VOC colour map: one module for the masks the synthetic world writes and the pictures evaluation draws.

Only numpy: `groupvit.synth` imports it to colour its palette PNG masks without pulling in torch or matplotlib.
"""
from __future__ import annotations

import numpy as np


def voc_palette(n: int = 256) -> np.ndarray:
    """[n, 3] uint8 colours of the PASCAL VOC colour map: the bits of class index i spread over R, G and B, from
    the high bit down (0 black, 1 (128, 0, 0), 15 (192, 128, 128), 255 (224, 224, 192)).

    Args:
        n: number of colours (256 for a PNG palette).
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
