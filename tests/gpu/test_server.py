import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from autotune.errors import TrialCrash
from autotune.gpu.procs import ProcessRegistry, is_alive
from autotune.gpu.server import (PREFIX_CACHING_OFF, PREFIX_CACHING_ON, Decision, ServerConfig, ServerKeeper,
                                 VllmServer, decide, free_port)

PY = "/py"
BASE = [PY, "-m", "vllm.entrypoints.openai.api_server"]


def _preset(**kw) -> ServerConfig:
    return ServerConfig(model="/run/model", served_model_name="llama-3.1-8b", dummy_weights=True,
                        has_tokenizer=False, **kw)


def test_command_vllm_torchtune_preset():
    cfg = _preset(gpu_memory_utilization=0.45)
    assert cfg.command(8123, python=PY) == BASE + [
        "--model", "/run/model", "--served-model-name", "llama-3.1-8b", "--host", "127.0.0.1",
        "--port", "8123", "--max-model-len", "2048", "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", "0.45", "--no-enable-log-requests", "--no-enable-prefix-caching",
        "--load-format", "dummy", "--skip-tokenizer-init",
    ]


def test_command_real_weights_with_tokenizer_two_gpus_and_user_flags():
    cfg = ServerConfig(model="/weights/llama", served_model_name="llama", dummy_weights=False,
                       has_tokenizer=True, tensor_parallel_size=2, gpu_memory_utilization=0.75,
                       extra_args=("--enforce-eager", "--max-num-seqs", "64"))
    argv = cfg.command(9000, python=PY)
    assert "--load-format" not in argv and "--skip-tokenizer-init" not in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.75"
    assert argv[-3:] == ["--enforce-eager", "--max-num-seqs", "64"]


def test_command_fig13_lora():
    mods = tuple((f"adapter-{i}", f"/run/lora/adapter-{i}") for i in range(8))
    cfg = _preset(gpu_memory_utilization=0.75, lora_modules=mods, max_lora_rank=16)
    argv = cfg.command(8000, python=PY)
    i = argv.index("--enable-lora")
    assert argv[i:] == ["--enable-lora", "--max-loras", "8", "--max-lora-rank", "16", "--lora-modules",
                        *(f"adapter-{k}=/run/lora/adapter-{k}" for k in range(8))]
    assert cfg.adapter_names == tuple(f"adapter-{k}" for k in range(8))
    with pytest.raises(AssertionError):
        _preset(lora_modules=mods)  # no max_lora_rank


def test_prefix_caching_off_by_default_on_when_asked():
    off, on = _preset(), _preset(enable_prefix_caching=True)
    assert PREFIX_CACHING_OFF in off.command(8000, python=PY) and PREFIX_CACHING_ON not in off.command(8000, python=PY)
    assert PREFIX_CACHING_ON in on.command(8000, python=PY) and PREFIX_CACHING_OFF not in on.command(8000, python=PY)
    assert off.prefix_caching is False and on.prefix_caching is True
    assert decide(_running(off), on) is Decision.RESTART_CHANGED  # the switch is part of the server's identity


@pytest.mark.parametrize("ours, user, runs_with", [
    (False, ("--enable-prefix-caching",), True),
    (True, ("--no-enable-prefix-caching",), False),
    (False, ("--enable_prefix_caching",), True),  # vLLM reads underscores as dashes
    (False, ("--enable-prefix-caching", "--max-num-seqs", "64", "--no-enable-prefix-caching"), False),  # last wins
])
def test_users_prefix_caching_switch_wins(ours, user, runs_with):
    cfg = _preset(enable_prefix_caching=ours, extra_args=user)
    argv = cfg.command(8000, python=PY)
    assert argv[-len(user):] == list(user)  # passed through as given
    switches = [a for a in argv if a.replace("_", "-") in (PREFIX_CACHING_ON, PREFIX_CACHING_OFF)]
    assert switches == [a for a in user if a.startswith("--") and "prefix" in a]  # none of ours added
    assert cfg.prefix_caching is runs_with


def test_flags_leave_out_interpreter_port_and_model_folder():
    cfg = _preset(gpu_memory_utilization=0.45, extra_args=("--enforce-eager",))
    assert cfg.flags() == [
        "--served-model-name", "llama-3.1-8b", "--host", "127.0.0.1", "--max-model-len", "2048",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.45", "--no-enable-log-requests",
        "--no-enable-prefix-caching", "--load-format", "dummy", "--skip-tokenizer-init", "--enforce-eager",
    ]
    assert cfg.flags() == replace(cfg, model="/elsewhere/model", port=9999).flags()  # the same on another machine


def test_our_server_flags_mean_what_we_say_to_vllms_own_parser(monkeypatch):
    """vLLM 0.20's server parser (``make_arg_parser``, built on EngineArgs)
    reads our command with the prefix-caching choice we meant."""
    pytest.importorskip("vllm")
    import vllm.platforms
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    if not vllm.platforms.current_platform.device_type:  # a CUDA build without a GPU: the parser needs a device
        from vllm.platforms.cpu import CpuPlatform

        monkeypatch.setattr(vllm.platforms, "_current_platform", CpuPlatform())

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser  # 0.20
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # older releases
    cases = [(_preset(), False), (_preset(enable_prefix_caching=True), True),
             (_preset(extra_args=("--enable-prefix-caching",)), True),
             (_preset(enable_prefix_caching=True, extra_args=("--no-enable-prefix-caching",)), False)]
    for cfg, runs_with in cases:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(cfg.command(8123, python=PY)[3:])
        assert args.enable_prefix_caching is runs_with is cfg.prefix_caching, cfg
        assert (args.port, args.served_model_name, args.load_format) == (8123, ["llama-3.1-8b"], "dummy")
        assert args.skip_tokenizer_init and args.gpu_memory_utilization == cfg.gpu_memory_utilization


class FakeServer:
    def __init__(self, config, log):
        self.config, self.log, self.alive, self.stopped = config, log, False, False

    def start(self):
        self.alive = True

    def is_alive(self):
        return self.alive

    def stop(self):
        self.alive, self.stopped = False, True


def _running(config: ServerConfig) -> FakeServer:
    server = FakeServer(config, None)
    server.start()
    return server


def test_decide_keep_or_restart():
    cfg = _preset(gpu_memory_utilization=0.45)
    running = FakeServer(cfg, None)
    running.start()
    assert decide(None, cfg) is Decision.START
    assert decide(running, _preset(gpu_memory_utilization=0.45)) is Decision.KEEP
    assert decide(running, _preset(gpu_memory_utilization=0.45, port=1234)) is Decision.KEEP  # port not compared
    assert decide(running, _preset(gpu_memory_utilization=0.75)) is Decision.RESTART_CHANGED
    assert decide(running, _preset(gpu_memory_utilization=0.45, env=(("CUDA_MPS_PIPE_DIRECTORY", "/p"),))) \
        is Decision.RESTART_CHANGED  # MPS on: the server must start as an MPS client
    running.alive = False
    assert decide(running, cfg) is Decision.RESTART_DIED


def test_keeper_keeps_and_restarts(tmp_path):
    keeper = ServerKeeper(tmp_path, ProcessRegistry(), factory=FakeServer)
    a = keeper.ensure(_preset(gpu_memory_utilization=0.45))
    assert keeper.ensure(_preset(gpu_memory_utilization=0.45)) is a and keeper.last_decision is Decision.KEEP
    b = keeper.ensure(_preset(gpu_memory_utilization=0.75))
    assert b is not a and a.stopped and keeper.last_decision is Decision.RESTART_CHANGED
    b.alive = False  # died between trials
    c = keeper.ensure(_preset(gpu_memory_utilization=0.75))
    assert c is not b and keeper.last_decision is Decision.RESTART_DIED
    assert [s.log.name for s in (a, b, c)] == ["vllm-server-1.log", "vllm-server-2.log", "vllm-server-3.log"]
    keeper.stop()
    assert c.stopped and keeper.server is None
    assert keeper.last_started == _preset(gpu_memory_utilization=0.75)  # what the results record, after the stop


# A stand-in server: answers /health and /v1/models, and starts a grandchild.
_FAKE_VLLM = textwrap.dedent("""
    import json, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(g.pid))
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body = b"vllm:request_queue_time_seconds_count 3.0\\n"
            else:
                body = b"" if self.path == "/health" else json.dumps(
                    {"data": [{"id": "llama-3.1-8b"}, {"id": "adapter-0"}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    print("serving", flush=True)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _fake_server(tmp_path, procs, port: int, adapter: str, startup_timeout_s: float) -> VllmServer:
    """The fake server above, asked to serve one LoRA adapter named ``adapter``
    (it serves only adapter-0); the grandchild's pid goes to ``g.pid``."""
    cfg = _preset(lora_modules=((adapter, f"/{adapter}"),), max_lora_rank=8, port=port)
    return VllmServer(cfg, tmp_path / "server.log", procs, startup_timeout_s=startup_timeout_s,
                      argv=[sys.executable, "-c", _FAKE_VLLM, str(port), str(tmp_path / "g.pid")])


def test_start_health_check_and_stop_kill_the_group(tmp_path):
    port = free_port()
    with ProcessRegistry() as procs:
        server = _fake_server(tmp_path, procs, port, "adapter-0", startup_timeout_s=30)
        server.start()
        grandchild = int((tmp_path / "g.pid").read_text())
        assert server.url == f"http://127.0.0.1:{port}"
        assert server.is_alive() and server.healthy() and server.startup_s is not None
        assert server.save_metrics(tmp_path / "m.prom")
        assert (tmp_path / "m.prom").read_text() == "vllm:request_queue_time_seconds_count 3.0\n"
        leader = server.proc.pid
        server.stop()
        assert not server.save_metrics(tmp_path / "gone.prom", timeout_s=1.0)  # a diagnostic: no answer, no file
        assert not (tmp_path / "gone.prom").exists()
        assert not server.is_alive()
        assert not is_alive(leader) and not is_alive(grandchild)
        assert procs.running == []
    assert "serving" in (tmp_path / "server.log").read_text()


def test_missing_adapter_means_not_ready(tmp_path):
    with ProcessRegistry() as procs:
        server = _fake_server(tmp_path, procs, free_port(), "adapter-5", startup_timeout_s=1.5)
        with pytest.raises(TrialCrash, match="not ready within 1.5 s"):
            server.start()
        assert procs.running == []  # the failed server was ended


def test_death_during_startup_is_a_trial_crash_with_the_log_line(tmp_path):
    script = "print('torch.OutOfMemoryError: CUDA out of memory', flush=True); raise SystemExit(3)"
    with ProcessRegistry() as procs:
        server = VllmServer(_preset(), tmp_path / "server.log", procs, startup_timeout_s=30,
                            argv=[sys.executable, "-c", script])
        with pytest.raises(TrialCrash, match=r"exited with code 3 during start-up: torch.OutOfMemoryError"):
            server.start()
        assert not server.is_alive()
