"""The REST shell: a small aiohttp application behind the relay's one port."""
