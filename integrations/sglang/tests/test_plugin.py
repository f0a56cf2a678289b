"""The plugin through SGLang's own machinery: entry point discovery, hooks applied, flags parsed,
refused or published, and the config read again in a spawned process that receives ``ServerArgs`` the
way SGLang's scheduler does. Scripts run in fresh interpreters (applied hooks patch SGLang for good),
two in all, because importing SGLang's server arguments costs several CPU seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

pytest.importorskip("sglang")

from tiermem_sglang.config import ENV_VAR

MODEL = "/nonexistent/model"  # parsing never opens it
OFFLOAD = ["--expert-tier", "cxl", "--expert-tier-slots", "8"]
INCOMPATIBLE = {
    "tp": (["--tp-size", "2"], "--tp-size 2: tiered experts serve one GPU; use --tp-size 1"),
    "paged": (["--enable-paged-experts", "--paged-experts-num-resident", "8"], "use it or --expert-tier, not both"),
    "eplb": (["--enable-eplb"], "drop --enable-eplb"),
    "dummy": (["--load-format", "dummy"], "--load-format dummy: the host tier needs real weights"),
}

CLI_SCRIPT = f"""
import contextlib, io, json, os
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import ServerArgs, prepare_server_args

report = {{"hooked": [hasattr(ServerArgs.add_cli_args, "__wrapped__"),
                      hasattr(ServerArgs.from_cli_args, "__wrapped__")]}}
prepare_server_args(["--model-path", "{MODEL}"])
report["published_without_flags"] = os.environ.get("{ENV_VAR}")
for name, (flags, _) in {INCOMPATIBLE!r}.items():
    try:
        prepare_server_args(["--model-path", "{MODEL}", *{OFFLOAD!r}, *flags])
        report[name] = "accepted"
    except Exception as error:
        report[name] = f"{{type(error).__name__}}: {{error}}"
report["published_after_refusals"] = os.environ.get("{ENV_VAR}")
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    try:
        prepare_server_args(["--model-path", "{MODEL}", *{OFFLOAD!r}, "--expert-tier-hbm-fraction", "0.5"])
    except SystemExit as stop:
        report["both_budgets"] = [stop.code, stderr.getvalue()]
print(json.dumps(report))
"""

WORKER_SCRIPT = f"""
import json, multiprocessing

def scheduler(server_args, queue):
    # What run_scheduler_process does first, then what a MoE layer reads.
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from tiermem_sglang import published
    queue.put({{"config": published().to_json(), "tp_size": server_args.tp_size,
               "fused_moe_hooked": hasattr(FusedMoE.__init__, "__wrapped__")}})

if __name__ == "__main__":
    from sglang.srt.plugins import load_plugins
    load_plugins()
    import sys
    from sglang.srt.server_args import prepare_server_args
    args = prepare_server_args(["--model-path", "{MODEL}", "--expert-tier", "cxl",
                                "--expert-tier-hbm-fraction", "0.25", "--engram-table-tier", "dram"])
    parent_moe_stack = "sglang.srt.layers.moe.fused_moe_triton.layer" in sys.modules
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=scheduler, args=(args, queue))
    worker.start()
    answer = queue.get(timeout=200)
    worker.join()
    answer["parent_imported_moe_stack"] = parent_moe_stack
    print(json.dumps(answer))
"""


def run_script(tmp_path, name: str, code: str) -> dict:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    script = subprocess.run([sys.executable, "-W", "ignore", str(path)], capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert script.returncode == 0, script.stderr[-3000:]
    return json.loads(script.stdout.strip().splitlines()[-1])


def test_plugin_is_discovered_through_its_entry_point():
    found = {ep.name: ep for ep in entry_points(group="sglang.srt.plugins")}
    assert found["tiermem"].value == "tiermem_sglang.plugin:register"
    assert found["tiermem"].dist.name == "tiermem-sglang"


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("cli"), "cli.py", CLI_SCRIPT)


def test_load_plugins_hooks_the_server_arguments(cli_report):
    assert cli_report["hooked"] == [True, True]


def test_without_tiermem_flags_nothing_is_published(cli_report):
    assert cli_report["published_without_flags"] is None


@pytest.mark.parametrize("name", sorted(INCOMPATIBLE))
def test_incompatible_settings_stop_the_cli_naming_the_flag_and_the_fix(cli_report, name):
    assert cli_report[name].startswith("ConfigError: tiermem-sglang: cannot start with these settings")
    assert INCOMPATIBLE[name][1] in cli_report[name]
    assert cli_report["published_after_refusals"] is None


def test_both_budgets_at_once_are_rejected_by_the_parser(cli_report):
    code, message = cli_report["both_budgets"]
    assert code == 2 and "not allowed with argument" in message


def test_flags_reach_a_spawned_scheduler_process_which_alone_hooks_the_moe_layers(tmp_path):
    answer = run_script(tmp_path, "worker.py", WORKER_SCRIPT)
    assert json.loads(answer["config"]) == {"expert_tier": "cxl", "hbm_fraction": 0.25, "slots": None,
                                            "pager": "device", "device_waves_max_tokens": 256,
                                            "predictor_path": None, "tiermem_config_path": None,
                                            "engram_table_tier": "dram"}
    assert answer["fused_moe_hooked"] and answer["tp_size"] == 1
    assert not answer["parent_imported_moe_stack"]
