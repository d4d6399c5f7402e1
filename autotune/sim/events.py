"""The discrete-event loop: pop the earliest event, let its action return the
events it causes.

Ties are broken by a priority class, then by the order of insertion, so a run
is deterministic. The sequence counter belongs to one queue (one simulation):
no state is shared between simulations.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable

#: An action runs at its event's time and returns the events it causes.
Action = Callable[[float], "Iterable[Event] | None"]
#: (time s, priority class: lower runs first at equal times, action)
Event = tuple[float, int, Action]

# Priority classes at equal times: a request that arrives at the instant an
# iteration ends is seen by the scheduler; the trainer's change of state is
# seen by the server's next iteration.
ARRIVAL = 0
TRAINER = 1
SERVER = 2
CONTROL = 3


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Action]] = []
        self._seq = 0
        self.now = 0.0  # s, time of the event being handled
        self.handled = 0  # events popped so far

    def push(self, time_s: float, priority: int, action: Action) -> None:
        assert time_s >= self.now - 1e-12, f"event in the past: {time_s} < {self.now}"
        heapq.heappush(self._heap, (time_s, priority, self._seq, action))
        self._seq += 1

    def extend(self, events: Iterable[Event] | None) -> None:
        for time_s, priority, action in events or ():
            self.push(time_s, priority, action)

    def run(self, until_s: float = math.inf, stop: Callable[[], bool] = lambda: False) -> float:
        """Handle events in time order until none is left, the next is after
        ``until_s``, or ``stop()`` is true. Returns the clock."""
        while self._heap and not stop():
            if self._heap[0][0] > until_s:
                self.now = until_s
                break
            time_s, _, _, action = heapq.heappop(self._heap)
            self.now = time_s
            self.handled += 1
            self.extend(action(time_s))
        return self.now
