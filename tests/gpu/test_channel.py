import subprocess
import sys
import textwrap

import pytest

from autotune.gpu.channel import Channel

_TRAINER_SIDE = textwrap.dedent("""
    import sys
    from autotune.gpu.channel import Channel
    ch = Channel.attach(sys.argv[1])
    print(ch.requests_in_flight(), int(ch.stop_requested()))
    ch.set_trainer_in_iteration(True)
    ch.close()
""")


def test_slots_start_at_zero_and_count():
    with Channel.create() as ch:
        assert (ch.requests_in_flight(), ch.trainer_in_iteration(), ch.stop_requested()) == (0, False, False)
        ch.add_in_flight(+1)
        ch.add_in_flight(+1)
        ch.add_in_flight(-1)
        assert ch.requests_in_flight() == 1
        ch.set_trainer_in_iteration(True)
        assert ch.trainer_in_iteration()
        ch.set_trainer_in_iteration(False)
        assert not ch.trainer_in_iteration()


def test_two_processes_share_slots_and_attacher_exit_keeps_block():
    ch = Channel.create()
    try:
        ch.add_in_flight(3)
        ch.request_stop()
        child = subprocess.run([sys.executable, "-c", _TRAINER_SIDE, ch.name],
                               capture_output=True, text=True, timeout=60)
        assert child.returncode == 0, child.stderr
        assert child.stdout.split() == ["3", "1"]
        assert ch.trainer_in_iteration()  # written by the other process
        # The attacher's exit neither unlinked the block nor warned about a leak.
        assert "leaked" not in child.stderr and "resource_tracker" not in child.stderr, child.stderr
        again = Channel.attach(ch.name)
        assert again.requests_in_flight() == 3
        again.close()
    finally:
        ch.close()
        ch.unlink()
    with pytest.raises(FileNotFoundError):
        Channel.attach(ch.name)


def test_only_the_creator_unlinks():
    with Channel.create() as ch:
        other = Channel.attach(ch.name)
        with pytest.raises(AssertionError):
            other.unlink()
        other.close()
