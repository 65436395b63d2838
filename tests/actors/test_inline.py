"""InlineActor: run by the threads that talk to it, one message at a time, in mailbox order,
handing off to the pool when nested too deep or busy too long; pykka's contract otherwise."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest
from pykka._envelope import Envelope

from paychan.actors import inline
from paychan.actors.inline import BUDGET, MAX_DEPTH, InlineActor

WAIT = 5.0


class Probe(InlineActor):
    """Records (message, thread) for every message; `react(self, message)` decides the rest."""

    def __init__(self, react: Callable[[Probe, Any], Any] | None = None) -> None:
        super().__init__()
        self.react = react
        self.lock = threading.Lock()
        self.seen: list[tuple[Any, threading.Thread]] = []
        self.events: list[Any] = []
        self.failures: list[tuple[Any, threading.Thread]] = []
        self.dead_letters: list[Any] = []

    def on_start(self) -> None:
        self.events.append(("start", threading.current_thread()))

    def on_receive(self, message: Any) -> Any:
        with self.lock:
            self.seen.append((message, threading.current_thread()))
        if self.react is not None:
            return self.react(self, message)
        return threading.get_ident()

    def on_stop(self) -> None:
        self.events.append(("stop", threading.current_thread()))

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self.failures.append((exception_value, threading.current_thread()))

    def on_dead_letter(self, message: Any) -> None:
        self.dead_letters.append(message)

    def messages(self) -> list[Any]:
        with self.lock:
            return [m for m, _ in self.seen]


class Boom(Exception):
    """What a failing handler raises."""


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[pykka.ActorRef[Any], Probe]]]:
    """`start(react=None)` -> (ref, actor); every actor still alive is stopped at the end."""
    refs: list[pykka.ActorRef[Any]] = []

    def make(react: Callable[[Probe, Any], Any] | None = None) -> tuple[
            pykka.ActorRef[Any], Probe]:
        ref = Probe.start(react)
        refs.append(ref)
        return ref, ref.actor_inbox.actor

    yield make
    for ref in refs:
        if ref.is_alive():
            ref.stop(timeout=WAIT)


def blocking_on(first: Any, entered: threading.Event,
                release: threading.Event) -> Callable[[Probe, Any], Any]:
    """A handler that blocks on message `first` until `release`."""
    def react(actor: Probe, message: Any) -> Any:
        if message == first:
            entered.set()
            assert release.wait(WAIT)
        return None
    return react


def test_tell_and_ask_run_on_the_callers_thread_when_idle(start) -> None:
    ref, actor = start()
    me = threading.current_thread()
    assert ref.ask("asked", timeout=WAIT) == threading.get_ident()
    ref.tell("told")
    # Handled before tell() returned, on this thread.
    assert actor.seen == [("asked", me), ("told", me)]
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(ref.ask("from-other", timeout=WAIT)))
    t.start()
    t.join(WAIT)
    assert other == [t.ident]
    assert actor.seen[-1] == ("from-other", t)


def test_on_start_runs_on_the_starting_thread_before_any_message(start) -> None:
    entered, release = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}

    class SlowStart(Probe):
        def on_start(self) -> None:
            super().on_start()
            holder["actor"] = self
            entered.set()
            assert release.wait(WAIT)

    started: list[pykka.ActorRef[Any]] = []
    starter = threading.Thread(target=lambda: started.append(SlowStart.start()))
    starter.start()
    try:
        assert entered.wait(WAIT)
        actor = holder["actor"]
        # Told while on_start runs: queued, not run on this thread, not before on_start ends.
        actor.actor_ref.tell("early")
        assert actor.seen == []
    finally:
        release.set()
    starter.join(WAIT)
    assert started and started[0].ask("late", timeout=WAIT) is not None
    assert actor.events == [("start", starter)]
    assert actor.messages() == ["early", "late"]
    assert actor.seen[0][1] is starter  # the starting thread handled what waited for it
    started[0].stop(timeout=WAIT)


def test_messages_from_many_threads_are_handled_one_at_a_time_in_sender_order(
        start) -> None:
    senders, per_sender = 8, 20
    active = [0]
    overlap = [0]
    guard = threading.Lock()

    def react(actor: Probe, message: Any) -> None:
        with guard:
            active[0] += 1
            overlap[0] = max(overlap[0], active[0])
        time.sleep(0.0005)
        with guard:
            active[0] -= 1

    ref, actor = start(react)
    barrier = threading.Barrier(senders)

    def send(sender: int) -> None:
        barrier.wait(WAIT)
        for i in range(per_sender):
            ref.tell((sender, i))

    threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    ref.ask("sync", timeout=WAIT)  # queued behind everything told before it
    got = [m for m in actor.messages() if m != "sync"]
    assert len(got) == senders * per_sender
    assert overlap[0] == 1
    for s in range(senders):
        assert [i for sender, i in got if sender == s] == list(range(per_sender))


def test_telling_itself_does_not_recurse(start) -> None:
    order: list[str] = []

    def react(actor: Probe, message: Any) -> None:
        order.append(f"{message} begins")
        if message == "first":
            actor.actor_ref.tell("second")
        order.append(f"{message} ends")

    ref, actor = start(react)
    ref.tell("first")
    assert order == ["first begins", "first ends", "second begins", "second ends"]
    me = threading.current_thread()
    assert actor.seen == [("first", me), ("second", me)]


def test_nesting_deeper_than_max_depth_hands_off_to_the_pool(start) -> None:
    length = MAX_DEPTH + 3
    done = threading.Event()
    actors: list[Probe] = []

    def react(actor: Probe, message: Any) -> None:
        index = actors.index(actor)
        if index + 1 < length:
            actors[index + 1].actor_ref.tell(message)
        else:
            done.set()

    for _ in range(length):
        actors.append(start(react)[1])
    actors[0].actor_ref.tell("hop")
    assert done.wait(WAIT)
    for a in actors:
        assert a.messages() == ["hop"]
    threads = [a.seen[0][1] for a in actors]
    me = threading.current_thread()
    assert threads[:MAX_DEPTH] == [me] * MAX_DEPTH
    for t in threads[MAX_DEPTH:]:
        assert t.name.startswith("paychan-actors")


def test_more_than_a_budget_of_queued_messages_are_all_handled(start) -> None:
    entered, release = threading.Event(), threading.Event()
    ref, actor = start(blocking_on("block", entered, release))
    runner = threading.Thread(target=ref.tell, args=("block",))
    runner.start()
    try:
        assert entered.wait(WAIT)
        total = 2 * BUDGET + 5
        for i in range(total):
            ref.tell(i)  # queued: the runner holds the actor
        assert actor.messages() == ["block"]
    finally:
        release.set()
    runner.join(WAIT)
    ref.ask("sync", timeout=WAIT)
    assert actor.messages() == ["block", *range(total), "sync"]
    by_runner = [m for m, t in actor.seen if t is runner]
    # The runner handled one budget, then the pool took over.
    assert len(by_runner) == BUDGET
    assert all(t.name.startswith("paychan-actors") for m, t in actor.seen[BUDGET:-1])


def test_ask_gets_the_exception_and_the_actor_lives(start) -> None:
    def react(actor: Probe, message: Any) -> Any:
        if message == "fail":
            raise Boom("asked to fail")
        return message

    ref, actor = start(react)
    with pytest.raises(Boom, match="asked to fail"):
        ref.ask("fail", timeout=WAIT)
    assert ref.is_alive()
    assert actor.failures == []
    assert ref.ask("fine", timeout=WAIT) == "fine"


def test_a_failing_tell_stops_the_actor_and_calls_on_failure(start) -> None:
    def react(actor: Probe, message: Any) -> None:
        if message == "fail":
            raise Boom("told to fail")

    ref, actor = start(react)
    ref.tell("fail")
    assert not ref.is_alive()
    assert len(actor.failures) == 1
    exc, thread = actor.failures[0]
    assert isinstance(exc, Boom)
    assert thread is threading.current_thread()
    assert ("stop", threading.current_thread()) not in actor.events  # on_stop is not called
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("after")
    assert actor.messages() == ["fail"]


def test_a_failing_tell_drops_nothing_quietly_behind_it(start) -> None:
    """Messages queued behind a failing one are dead letters; queued asks get ActorDeadError."""
    entered, release = threading.Event(), threading.Event()

    def react(actor: Probe, message: Any) -> None:
        if message == "fail":
            entered.set()
            assert release.wait(WAIT)
            raise Boom("told to fail")

    ref, actor = start(react)
    runner = threading.Thread(target=ref.tell, args=("fail",))
    runner.start()
    try:
        assert entered.wait(WAIT)
        ref.tell("queued")
        asked = ref.ask("queued-ask", block=False)
    finally:
        release.set()
    runner.join(WAIT)
    with pytest.raises(pykka.ActorDeadError):
        asked.get(timeout=WAIT)
    assert actor.dead_letters == ["queued"]
    assert actor.messages() == ["fail"]


class Fatal(BaseException):
    """Not an Exception: pykka stops the actor rather than report it."""


def test_asks_queued_behind_a_base_exception_are_answered(start) -> None:
    """As with pykka's threading actor, an ask waiting in the mailbox of an actor that died
    of a BaseException gets ActorDeadError instead of waiting forever."""
    entered, release = threading.Event(), threading.Event()

    def react(actor: Probe, message: Any) -> None:
        if message == "fatal":
            entered.set()
            assert release.wait(WAIT)
            raise Fatal("fatal")

    ref, actor = start(react)

    def run() -> None:
        with contextlib.suppress(Fatal):  # it reaches the thread that ran the actor
            ref.tell("fatal")

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert entered.wait(WAIT)
        asked = ref.ask("queued", block=False)
    finally:
        release.set()
    runner.join(WAIT)
    assert not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        asked.get(timeout=1.0)
    assert actor.messages() == ["fatal"]


def test_stop_and_dead_letters(start) -> None:
    entered, release = threading.Event(), threading.Event()
    ref, actor = start(blocking_on("block", entered, release))
    runner = threading.Thread(target=ref.tell, args=("block",))
    runner.start()
    try:
        assert entered.wait(WAIT)
        before = ref.ask("before-stop", block=False)
        stopped = ref.stop(block=False)
        ref.tell("behind-stop")  # still alive: accepted, but it is after the stop
        asked = ref.ask("ask-behind-stop", block=False)
    finally:
        release.set()
    runner.join(WAIT)
    assert before.get(timeout=WAIT) is None  # what came before the stop is handled
    assert stopped.get(timeout=WAIT) is True
    assert not ref.is_alive()
    assert [e for e, _ in actor.events] == ["start", "stop"]
    with pytest.raises(pykka.ActorDeadError):
        asked.get(timeout=WAIT)
    assert actor.dead_letters == ["behind-stop"]
    # ActorRef.tell refuses a dead actor; a message that reaches its inbox anyway is a
    # dead letter too, never handled.
    with pytest.raises(pykka.ActorDeadError):
        ref.tell("refused")
    actor.actor_inbox.put(Envelope("late"))
    assert actor.dead_letters == ["behind-stop", "late"]
    assert actor.messages() == ["block", "before-stop"]
    assert ref.stop(timeout=WAIT) is False  # already dead


def test_stop_on_an_idle_actor_runs_on_stop_on_the_caller(start) -> None:
    ref, actor = start()
    assert ref.stop(timeout=WAIT) is True
    assert actor.events == [("start", threading.current_thread()),
                            ("stop", threading.current_thread())]
    assert not ref.is_alive()
    assert pykka.ActorRegistry.get_by_urn(actor.actor_urn) is None


def test_pool_threads_are_named(start) -> None:
    """The handoff pool is the one named in the docs (`paychan-actors`)."""
    ran: list[str] = []
    finished = threading.Event()
    inline._handoff(lambda: (ran.append(threading.current_thread().name), finished.set()))
    assert finished.wait(WAIT)
    assert ran[0].startswith("paychan-actors")
