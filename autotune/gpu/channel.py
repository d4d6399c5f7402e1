"""The shared-memory channel between the load generator and the trainer.

A few int64 slots in one POSIX shared-memory block, each with a single
writer: the load generator (in the backend process) counts requests in
flight, the trainer (another process) says whether it is inside an iteration,
and the backend asks the trainer to stop. Aligned 8-byte stores are not torn
on the machines we run on, and with one writer per slot no lock is needed.

The backend creates the channel and passes its ``name`` to the trainer, which
attaches. Only the creator unlinks it. Attach from a process started with
``subprocess`` (as the trainer is): it has its own resource tracker, from which
``attach`` removes the block so that the trainer's exit neither unlinks it nor
warns about a leak (Python 3.11 and 3.12 register every attached block; 3.13
has ``track=False``).
"""

from __future__ import annotations

import struct
import sys
from multiprocessing import resource_tracker, shared_memory

_SLOT = struct.Struct("<q")  # one int64
_IN_FLIGHT = 0  # requests sent and not finished + held at the FineInfer gate; writer: load generator
_IN_ITERATION = 1  # 1 while the trainer is inside an iteration; writer: trainer
_STOP = 2  # 1 once the backend asked the trainer to stop; writer: backend
_NUM_SLOTS = 3


class Channel:
    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._owner = owner  # created it (and so unlinks it)
        self.name: str = shm.name

    @classmethod
    def create(cls, name: str | None = None) -> Channel:
        shm = shared_memory.SharedMemory(name=name, create=True, size=_NUM_SLOTS * _SLOT.size)
        shm.buf[: _NUM_SLOTS * _SLOT.size] = bytes(_NUM_SLOTS * _SLOT.size)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Channel:
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        else:
            shm = shared_memory.SharedMemory(name=name)
            # Python < 3.13 registered it for unlinking at this process's exit.
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, owner=False)

    def _get(self, slot: int) -> int:
        return _SLOT.unpack_from(self._shm.buf, slot * _SLOT.size)[0]

    def _set(self, slot: int, value: int) -> None:
        _SLOT.pack_into(self._shm.buf, slot * _SLOT.size, value)

    def requests_in_flight(self) -> int:
        """Requests sent and not finished, plus those held at the FineInfer gate."""
        return self._get(_IN_FLIGHT)

    def add_in_flight(self, delta: int) -> None:
        """Load generator only (the slot's single writer)."""
        self._set(_IN_FLIGHT, self._get(_IN_FLIGHT) + delta)

    def trainer_in_iteration(self) -> bool:
        return self._get(_IN_ITERATION) != 0

    def set_trainer_in_iteration(self, value: bool) -> None:
        """Trainer only."""
        self._set(_IN_ITERATION, int(value))

    def stop_requested(self) -> bool:
        return self._get(_STOP) != 0

    def request_stop(self) -> None:
        self._set(_STOP, 1)

    def close(self) -> None:
        self._shm.close()

    def unlink(self) -> None:
        """Remove the block (creator only; the others just close)."""
        assert self._owner, "only the process that created the channel unlinks it"
        self._shm.unlink()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._owner:
            self.unlink()
