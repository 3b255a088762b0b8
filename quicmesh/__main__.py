"""`python -m quicmesh`: the same as the `quicmesh` command (the demo starts its nodes this way)."""

from quicmesh.cli import main

raise SystemExit(main())
