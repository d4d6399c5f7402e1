import pytest

from autotune.errors import UserError
from autotune.gpu.mps import MpsDaemon


class FakeRunner:
    """Records the commands instead of running them."""

    def __init__(self, code: int = 0, output: str = "") -> None:
        self.calls = []
        self.code, self.output = code, output

    def __call__(self, argv, env, stdin):
        self.calls.append((list(argv), dict(env), stdin))
        return self.code, self.output


def _daemon(tmp_path, runner, found=True):
    return MpsDaemon(tmp_path / "pipe", tmp_path / "log", runner=runner,
                     which=lambda name: f"/usr/bin/{name}" if found else None)


def test_start_and_stop_command_lines_and_env(tmp_path):
    runner = FakeRunner()
    with _daemon(tmp_path, runner) as mps:
        assert (tmp_path / "pipe").is_dir() and (tmp_path / "log").is_dir()
    (start_argv, start_env, start_in), (stop_argv, stop_env, stop_in) = runner.calls
    assert start_argv == ["/usr/bin/nvidia-cuda-mps-control", "-d"] and start_in is None
    assert stop_argv == ["/usr/bin/nvidia-cuda-mps-control"] and stop_in == "quit\n"
    for env in (start_env, stop_env):
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "pipe")
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "log")
        assert "PATH" in env  # the rest of the environment is kept
    assert not mps.running


def test_stop_quits_once_and_only_if_started(tmp_path):
    runner = FakeRunner()
    mps = _daemon(tmp_path, runner)
    mps.stop()
    assert runner.calls == []
    mps.start()
    mps.stop()
    mps.stop()
    assert [c[2] for c in runner.calls] == [None, "quit\n"]


def test_stop_runs_when_the_block_raises(tmp_path):
    runner = FakeRunner()
    with pytest.raises(RuntimeError):
        with _daemon(tmp_path, runner):
            raise RuntimeError("server died")
    assert runner.calls[-1][2] == "quit\n"


def test_client_env(tmp_path):
    mps = _daemon(tmp_path, FakeRunner())
    trainer = mps.env_for_client(30)
    assert trainer == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
                       "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
                       "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in mps.env_for_client(None)
    with pytest.raises(AssertionError):
        mps.env_for_client(0)


def test_missing_binary_is_a_user_error_naming_no_mps(tmp_path):
    with pytest.raises(UserError, match="--no-mps"):
        _daemon(tmp_path, FakeRunner(), found=False).start()


def test_failed_start_is_a_user_error_with_the_output(tmp_path):
    mps = _daemon(tmp_path, FakeRunner(code=1, output="An instance of this daemon\nis already running"))
    with pytest.raises(UserError, match=r"exit code 1: An instance of this daemon is already running.*--no-mps"):
        mps.start()
    assert not mps.running
