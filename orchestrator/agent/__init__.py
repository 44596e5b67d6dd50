"""The node agent (DESIGN §6): one asyncio process per node owning its kernel state."""
