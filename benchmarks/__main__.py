"""`python -m benchmarks`: see benchmarks/harness.py."""

from .harness import main

raise SystemExit(main())
