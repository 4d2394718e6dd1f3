"""Zero-shot evaluation: the `evaluate` config (`config`), data sets (VOC layout and friends, `datasets`), models and
their segmenters (`inference`), the reference segmentation algorithm (`segmentation`), dataset loops (`runner`),
metrics, classification, diagnostics, reported figures (`results`), tuned thresholds (`thresholds`) and pictures
(`visualize`, colours in `palette`). Pure library code: no tracking, files only where a function says so.

Kept free of imports: `groupvit.synth` imports `palette` without loading torch."""
