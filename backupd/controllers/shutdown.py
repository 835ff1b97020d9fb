"""The `shutdown` method: no Docker socket, no commands; Redis's restart policy does the start.

The files are swapped in while Redis runs (after `CONFIG SET save ""` and with no child process),
then `SHUTDOWN NOSAVE NOW` makes Redis exit without writing anything, and the container's restart
policy (`always` or `unless-stopped`) starts it on the new files. Redis cannot report that policy,
so the restore waits for a new `run_id` within `restore.start_timeout` and says what to check when
none appears.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from backupd.errors import RestoreError


class ShutdownController:
    name = "shutdown"
    swap_while_running = True

    def __init__(self, connect: Callable[[], redis.Redis]) -> None:
        self.connect = connect

    def describe(self) -> str:
        return ("shutdown: swap the files while Redis runs, then SHUTDOWN NOSAVE NOW; "
                "the restart policy starts Redis again")

    def check(self) -> None:
        """Nothing to reach besides Redis itself, which step 2 already asks."""

    def is_running(self) -> bool | None:
        return None

    def server_version(self) -> str | None:
        return None

    def stop(self) -> None:
        client = self.connect()
        try:
            client.execute_command("SHUTDOWN", "NOSAVE", "NOW")  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError:
            return  # the expected outcome: Redis closed the connection as it exited
        except redis.exceptions.NoPermissionError:
            raise RestoreError("the Redis user cannot run SHUTDOWN: grant +shutdown for the "
                               "shutdown restore method") from None
        except redis.exceptions.ResponseError as exc:
            raise RestoreError(f"Redis refused SHUTDOWN NOSAVE NOW: {exc}") from None
        finally:
            client.close()

    def start(self) -> None:
        """The restart policy starts Redis; the restore waits for a new run_id."""

    def not_back_hint(self) -> str:
        return ("the shutdown method needs the Redis container's restart policy to be 'always' "
                "or 'unless-stopped'; start Redis yourself (e.g. `docker compose start redis`) "
                "and it loads the restored files")
