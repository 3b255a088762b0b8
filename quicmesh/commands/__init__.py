"""The `quicmesh` command's groups of subcommands, kept out of quicmesh/cli.py (which builds the parser)."""
