"""The agent's record of whether the shadow holds its latest report (ADR 44), pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from device_agent.report_ledger import MAX_WAIT_FACTOR, ReportLedger


def sent(token: str = "t-1", now: float = 100.0, wait: float = 30.0) -> ReportLedger:
    ledger = ReportLedger(wait)
    ledger.sent(token, now)
    return ledger


def test_a_report_is_answered_by_its_own_accepted() -> None:
    ledger = sent()
    assert ledger.due_in(110.0) == 20.0
    assert ledger.on_accepted("t-1", 7, wrote_firmware=True) is False
    assert ledger.due_in(1_000.0) is None


def test_an_unanswered_report_is_due_after_its_wait() -> None:
    ledger = sent()
    assert ledger.due_in(129.9) is not None and ledger.due_in(129.9) > 0  # type: ignore[operator]
    assert ledger.due_in(130.0) == 0.0
    assert ledger.due_in(500.0) == 0.0


def test_someone_elses_answer_does_not_answer_the_latest_report() -> None:
    ledger = sent()
    ledger.on_accepted("t-0", 5, wrote_firmware=True)
    ledger.on_accepted(None, 6, wrote_firmware=False)
    ledger.on_rejected("t-0")
    ledger.on_rejected(None)
    assert ledger.due_in(130.0) == 0.0


def test_a_rejection_of_the_latest_report_answers_it() -> None:
    ledger = sent()
    ledger.on_rejected("t-1")
    assert ledger.due_in(1_000.0) is None


def test_an_older_report_written_after_the_latest_overwrites_it() -> None:
    ledger = sent("t-2")
    assert ledger.on_accepted("t-2", 10, wrote_firmware=True) is False
    assert ledger.on_accepted("t-1", 11, wrote_firmware=True) is True


def test_the_overwrite_is_seen_whichever_answer_arrives_first() -> None:
    ledger = sent("t-2")
    assert ledger.on_accepted("t-1", 11, wrote_firmware=True) is False  # own answer not in yet
    assert ledger.on_accepted("t-2", 10, wrote_firmware=True) is True


def test_an_older_report_written_before_the_latest_is_no_overwrite() -> None:
    ledger = sent("t-2")
    assert ledger.on_accepted("t-1", 9, wrote_firmware=True) is False  # late answer, early write
    assert ledger.on_accepted("t-2", 10, wrote_firmware=True) is False


def test_updates_that_do_not_write_the_firmware_report_are_no_overwrite() -> None:
    ledger = sent("t-2")
    ledger.on_accepted("t-2", 10, wrote_firmware=True)
    assert ledger.on_accepted("app-token", 11, wrote_firmware=False) is False
    assert ledger.on_accepted(None, 12, wrote_firmware=False) is False


def test_a_new_report_starts_afresh() -> None:
    ledger = sent("t-2")
    ledger.on_accepted("t-2", 10, wrote_firmware=True)
    ledger.on_accepted("t-1", 11, wrote_firmware=True)
    ledger.sent("t-3", 200.0)
    assert ledger.on_accepted("t-3", 12, wrote_firmware=True) is False


def test_malformed_answers_change_nothing() -> None:
    ledger = sent("t-2")
    for version in (None, "12", 1.5, True, [1]):
        assert ledger.on_accepted("t-2", version, wrote_firmware=True) is False
    assert ledger.due_in(130.0) == 0.0  # still unanswered
    assert ledger.on_accepted(["t-2"], 12, wrote_firmware=True) is False


def test_the_wait_doubles_while_re_sends_go_unanswered_and_resets_on_an_answer() -> None:
    ledger = sent(wait=10.0)
    waits = []
    for n in range(8):
        waits.append(ledger.current_wait())
        ledger.resending_overdue()
        ledger.sent(f"t-{n + 2}", 0.0)
    assert waits == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 320.0, 320.0]
    assert MAX_WAIT_FACTOR == 32
    ledger.on_accepted("t-9", 3, wrote_firmware=True)
    assert ledger.current_wait() == 10.0


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 100), st.booleans()), max_size=20),
)
def test_an_overwrite_is_reported_exactly_when_a_later_write_of_another_report_exists(
    answers: list[tuple[int, int, bool]],
) -> None:
    """Against the definition: once the latest report (token 0) is accepted at version v, the
    ledger says "overwritten" exactly when some other firmware write was accepted above v."""
    ledger = sent("0")
    own: int | None = None
    others: list[int] = []
    for token, version, wrote in answers:
        said = ledger.on_accepted(str(token), version, wrote)
        if token == 0:
            own = version
        elif wrote:
            others.append(version)
        expected = own is not None and any(v > own for v in others)
        assert said is expected
