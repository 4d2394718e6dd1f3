"""Zero-shot evaluation: data sets (VOC layout and friends), the reference segmentation algorithm, metrics,
classification, diagnostics and pictures. Pure library code: no tracking, files only where a function says so."""
