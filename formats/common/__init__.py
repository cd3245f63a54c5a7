"""Not the cache contract: the utilities both stages share, at the bottom layer beside it (the stages meet
only in formats/). settings.py (each setting declared once: flags, YAML, merge), hardware.py (CPU/GPU
detection, bf16 rules, memory), prefetch.py (an iterator run ahead in a thread), cli.py (the one-line
error runner of both entry points). Nothing here imports the contract's modules but formats.errors."""
