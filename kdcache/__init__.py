"""kdcache: the product's own namespace — the `kdcache` command (cli.py) and the end-to-end demo
(demo.py), which orchestrate the three stages: cache_teacher (teacher -> cache), formats (the cache),
train_student (cache -> student). The stages do not import each other; only this package sees all three."""
