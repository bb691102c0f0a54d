"""The bytes of request bodies the server holds at once, all requests together. A body is parsed into Python
objects several times its size (an 8 MB list of floats: about 30 MB), so 40 such requests at once took 1.6 GB;
under the budget a request waits for room, and past a short wait it is answered 503 (busy, retry)."""

from __future__ import annotations

import asyncio


class BodyBudget:
    """`total` bytes shared by the requests of one event loop (every request passes through it in turn)."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._changed = asyncio.Condition()

    async def take(self, size: int, wait_s: float) -> bool:
        """Hold `size` more bytes, waiting up to `wait_s` seconds for room; False if none came (nothing held)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= size), wait_s)
            except TimeoutError:
                return False
            self.free -= size
            return True

    async def give(self, size: int) -> None:
        """Give back `size` held bytes."""
        if size:
            async with self._changed:
                self.free += size
                self._changed.notify_all()
