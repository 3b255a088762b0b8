"""Dynamic membership (issue 16): signed announcements, the membership messages, the sans-I/O core and the
feature that runs them. docs/PROTOCOL.md "Membership" is the wire spec. Import the submodules directly;
this package imports nothing, so that light code (client commands) can name it without loading crypto."""
