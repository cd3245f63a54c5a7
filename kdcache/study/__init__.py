"""The study tools, above both stages: `kdcache eval` (evaluate.py: lm-evaluation-harness on students),
`kdcache report` (report.py: runs grouped by what differs, KD - SFT per data fraction) and `kdcache plot`
(plot.py: loss curves and the study figure). They read run folders and caches' manifests; neither stage
imports them."""
