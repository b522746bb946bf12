"""The credit journal: a creditId is taken once, ever, and that survives a crash."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from insertcoin.agent.journal import Journal


def test_duplicate_returns_the_earlier_answer(tmp_path: Path) -> None:
    """A second record of the same creditId adds nothing and repeats the first answer."""
    journal = Journal(tmp_path / "agent.db")
    first = journal.record("cr_1", 3)
    again = journal.record("cr_1", 3)
    assert (first.result, first.duplicate) == ("applied", False)
    assert (again.result, again.duplicate) == ("applied", True)
    assert journal.counter().credits == 3
    rejected = journal.reject("cr_2", 1, "expired")
    assert journal.record("cr_2", 1).reason == "expired"
    assert rejected.result == "rejected"
    assert journal.counter().credits == 3


def test_survives_reopen(tmp_path: Path) -> None:
    """Grants, credits and state are still there after the journal is closed and reopened."""
    journal = Journal(tmp_path / "agent.db")
    journal.record("cr_1", 2)
    assert journal.take_one("playing")
    journal.close()
    reopened = Journal(tmp_path / "agent.db")
    assert reopened.record("cr_1", 2).duplicate
    assert reopened.counter().credits == 1
    assert reopened.counter().state == "playing"


def test_recent_applied_lists_the_latest_applies_oldest_first(tmp_path: Path) -> None:
    """What the coming-online status reports: applied creditIds only, the latest
    `limit`, in the order they were applied."""
    journal = Journal(tmp_path / "agent.db")
    assert journal.recent_applied(3) == ()
    for n in range(5):
        journal.record(f"cr_{n}", 1)
    journal.reject("cr_refused", 1, "expired")
    journal.record("cr_2", 1)  # a duplicate changes nothing
    assert journal.recent_applied(3) == ("cr_2", "cr_3", "cr_4")
    assert journal.recent_applied(10) == ("cr_0", "cr_1", "cr_2", "cr_3", "cr_4")
    journal.close()


def test_take_one_never_goes_negative(tmp_path: Path) -> None:
    """Spending a credit when none is held changes nothing."""
    journal = Journal(tmp_path / "agent.db")
    assert not journal.take_one("playing")
    assert journal.counter().credits == 0
    assert journal.counter().state == "attract"


def test_record_survives_sigkill(tmp_path: Path) -> None:
    """A process SIGKILLed right after `record` returns still has the grant on reopen."""
    path = tmp_path / "agent.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from insertcoin.agent.journal import Journal
        journal = Journal(Path({str(path)!r}))
        journal.record("cr_killed", 4)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=30, check=False)
    assert done.returncode == -signal.SIGKILL
    assert os.path.exists(path)
    journal = Journal(path)
    assert journal.record("cr_killed", 4).duplicate
    assert journal.counter().credits == 4
