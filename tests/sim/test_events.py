from autotune.sim.events import ARRIVAL, SERVER, TRAINER, EventQueue


def test_events_run_in_time_order_and_actions_add_events():
    q = EventQueue()
    seen = []

    def at(name):
        def action(now):
            seen.append((name, now))
            if name == "a":
                return [(now + 0.5, SERVER, at("c"))]
            return None
        return action

    q.push(1.0, SERVER, at("b"))
    q.push(0.2, SERVER, at("a"))
    q.run()
    assert seen == [("a", 0.2), ("c", 0.7), ("b", 1.0)]
    assert q.handled == 3


def test_ties_break_by_priority_then_insertion_order():
    q = EventQueue()
    seen = []
    for name, prio in [("server1", SERVER), ("trainer", TRAINER), ("server2", SERVER), ("arrival", ARRIVAL)]:
        q.push(1.0, prio, lambda now, n=name: seen.append(n))
    q.run()
    assert seen == ["arrival", "trainer", "server1", "server2"]


def test_run_stops_at_horizon_and_on_condition():
    q = EventQueue()
    seen = []
    for t in (1.0, 2.0, 3.0):
        q.push(t, SERVER, lambda now: seen.append(now))
    assert q.run(until_s=2.5) == 2.5
    assert seen == [1.0, 2.0]
    q2 = EventQueue()
    for t in (1.0, 2.0, 3.0):
        q2.push(t, SERVER, lambda now: seen.append(now))
    q2.run(stop=lambda: len(seen) >= 3)
    assert seen == [1.0, 2.0, 1.0]


def test_queues_share_no_state():
    a, b = EventQueue(), EventQueue()
    a.push(0.0, SERVER, lambda now: None)
    a.run()
    assert b.handled == 0 and b._seq == 0
