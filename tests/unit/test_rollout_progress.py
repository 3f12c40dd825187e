"""GetRollout's counts come from a GROUP BY (`progress_from_counts`); they must equal the
planner's `progress` over the executions themselves, for any mix of statuses and rollbacks."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from services.rollout.domain import Execution, ExecutionStatus, Rollout
from services.rollout.planner import progress, progress_from_counts
from tests.unit.rollout_builders import definition

executions = st.lists(
    st.tuples(st.sampled_from(list(ExecutionStatus)), st.booleans()),
    max_size=60,
)


@given(executions, st.integers(min_value=0, max_value=80))
def test_counts_give_the_same_progress_as_the_executions(
    drawn: list[tuple[ExecutionStatus, bool]], extra_targets: int
) -> None:
    rollout = Rollout(definition())
    rows = [
        Execution(
            device_id=f"d-{i}",
            stage=0,
            stratum="",
            previous=None,
            status=status,
            attempt=1,
            notified_at=(1.0,),
            updated_at=1.0,
            rollback_requested_at=2.0 if requested else None,
        )
        for i, (status, requested) in enumerate(drawn)
    ]
    groups = Counter((e.status, e.rollback_requested_at is not None) for e in rows)
    targets = len(rows) + extra_targets
    from_counts = progress_from_counts(
        rollout, [(s, r, n) for (s, r), n in groups.items()], targets
    )
    assert from_counts == progress(rollout, rows, targets)
