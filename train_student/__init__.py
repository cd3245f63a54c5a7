"""Train students from teacher top-k caches: packed data, sparse-KL loss, the trainer and its CLI.

Modules follow the flow cache -> batch -> loss -> step: config.py (TrainConfig, stages), data.py
(reader -> packed batches, split), checks.py (cache vs student safety checks), model.py (load / prune the student), loss.py
(kd_loss), train.py (the loop), checkpoint.py, cli.py (`kdcache train`, `kdcache plot`).
Importing the package is cheap: torch and transformers load in the modules that need them.
"""
