from quicmesh.bench.cli import main

raise SystemExit(main())
