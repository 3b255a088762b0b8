"""`python -m quicmesh`: the same as the `quicmesh` command (the demo starts its nodes this way)."""

from .cli import main

raise SystemExit(main())
