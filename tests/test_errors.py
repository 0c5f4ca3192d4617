"""The one reader of an exception raised on a Ray worker, used by `generate` and `serve --ray`."""
from ddpm_deploy.errors import UserError, remote_cause


class _TaskError(Exception):
    """Shaped like ray.exceptions.RayTaskError: Ray's frame first, the worker's exception as `.cause`."""

    def __init__(self, cause):
        super().__init__(f"ray::render_shard() (pid=1, ip=127.0.0.1)\n  File \"x.py\", line 1\n{cause!r}")
        self.cause = cause


def test_a_task_error_gives_its_cause_line():
    assert remote_cause(_TaskError(UserError("non-finite values at step 3\nmore"))) == "non-finite values at step 3"


def test_a_serve_error_gives_the_user_error_line_from_its_text():
    e = RuntimeError("Deployment failed\nTraceback ...\nddpm_deploy.errors.UserError: the engine is not a file\n")
    assert remote_cause(e) == "the engine is not a file"


def test_anything_else_gives_its_first_line():
    assert remote_cause(RuntimeError("\nfirst\nsecond")) == "first"
