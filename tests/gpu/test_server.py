import sys
import textwrap
from pathlib import Path

import pytest

from autotune.errors import TrialCrash
from autotune.gpu.procs import ProcessRegistry, is_alive
from autotune.gpu.server import Decision, ServerConfig, ServerKeeper, VllmServer, decide, free_port

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
        "--gpu-memory-utilization", "0.45", "--no-enable-log-requests",
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


class FakeServer:
    def __init__(self, config, log):
        self.config, self.log, self.alive, self.stopped = config, log, False, False

    def start(self):
        self.alive = True

    def is_alive(self):
        return self.alive

    def stop(self):
        self.alive, self.stopped = False, True


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


# A stand-in server: answers /health and /v1/models, and starts a grandchild.
_FAKE_VLLM = textwrap.dedent("""
    import json, subprocess, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(g.pid))
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
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
        leader = server.proc.pid
        server.stop()
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
