"""kdcache's offline lm-eval tasks (`kdcache eval --tasks kdcache_heldout_chat,kdcache_arith_qa`): the task YAMLs,
their helpers (utils.py, named by the YAMLs' `!function` tags) and data/. A package so that the wheel carries
them (pyproject.toml's package-data); evaluate.py puts this folder on lm-eval's task path."""
