"""Control API (aiohttp on a unix socket) and the CLI verbs that talk to it."""
