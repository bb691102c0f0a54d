"""The bytes of request bodies the server parses and answers at once, all requests together. A body is parsed into
Python objects several times its size (an 8 MB list of floats: about 30 MB), so 40 such requests at once took
0.8 to 1.5 GB; under the budget a whole body waits for room, first come first served, and past a short wait it is
answered 503 (busy, retry). A body is charged once it has arrived: a slow upload holds no room."""

from __future__ import annotations

import asyncio
from collections import deque


class BodyBudget:
    """`total` bytes shared by the requests of one event loop."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int, wait_s: float) -> bool:
        """Hold `size` bytes, waiting up to `wait_s` seconds behind those who asked first; False if no room came
        (nothing is held then). Cancelled while waiting, it holds nothing either."""
        if size == 0:  # nothing to hold: a probe's GET waited behind queued bodies, and was answered 503
            return True
        if not self._waiting and size <= self.free:
            self.free -= size
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, turn)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(turn)
            return True
        except TimeoutError:
            if turn.done():  # room came as the wait ran out: taken
                return True
            self._withdraw(entry)
            return False
        except asyncio.CancelledError:
            if turn.done():  # granted, but nobody will give it back
                self.give(size)
            else:
                self._withdraw(entry)
            raise

    def give(self, size: int) -> None:
        """Give back `size` held bytes (no await: a cancelled request still gives them back)."""
        self.free += size
        self._grant()

    def _withdraw(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        self._waiting.remove(entry)
        entry[1].cancel()
        self._grant()  # those behind it may fit now

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, turn = self._waiting.popleft()
            self.free -= size
            turn.set_result(None)
