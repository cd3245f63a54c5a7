"""`python -m kdcache ...` = the `kdcache` command."""

import sys

from kdcache.cli import main

sys.exit(main())
