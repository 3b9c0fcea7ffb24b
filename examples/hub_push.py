# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Whether `--push_to_hub` can work from here, checked once before the example scripts load a model.

Without this check a script run with `--push_to_hub` on a machine without the Hub fails at `Trainer(...)` (the
Trainer creates the repository there) with a long traceback, and saves nothing. The scripts call
`skip_push_if_unreachable(training_args, logger)` right after parsing their arguments: when a push cannot work it
logs one line saying why, turns `push_to_hub` off, and the run goes on to write the model and its card locally.

A push cannot work when the Hub is switched off (`HF_HUB_OFFLINE=1`), when there is no token (`hf auth login` or
`HF_TOKEN`), or when `whoami` at the Hub endpoint does not answer within a few seconds (no network, a bad token).
Only `huggingface_hub` is used.
"""

from __future__ import annotations

import logging
import threading

from huggingface_hub import HfApi, constants, get_token


WHOAMI_TIMEOUT_S = 10.0


def push_unavailable_reason(token: str | None = None, timeout_s: float = WHOAMI_TIMEOUT_S) -> str | None:
    """Why a push to the Hub cannot work from this process, or `None` when it can.

    Parameters:
        token (`str`, *optional*): the token the push will use (`--hub_token`); defaults to `get_token()`.
        timeout_s (`float`, defaults to 10): how long to wait for the Hub's `whoami` answer.
    """
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    token = token or get_token()
    if token is None:
        return "no Hugging Face token (log in with `hf auth login` or set HF_TOKEN)"
    answer: dict = {}

    def whoami() -> None:
        try:
            answer["user"] = HfApi().whoami(token=token)
        except Exception as error:  # any failure means the push would fail too; report it in the one line
            answer["error"] = error

    # `whoami` has no timeout argument: run it in a daemon thread and stop waiting after `timeout_s`.
    thread = threading.Thread(target=whoami, name="hub-whoami", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"the Hub at {constants.ENDPOINT} did not answer within {timeout_s:g} s"
    if "error" in answer:
        first_line = (str(answer["error"]).strip().splitlines() or [type(answer["error"]).__name__])[0]
        return f"the Hub at {constants.ENDPOINT} cannot be reached with this token ({first_line})"
    return None


def skip_push_if_unreachable(training_args, logger: logging.Logger) -> bool:
    """Turn `training_args.push_to_hub` off, with one log line, when the push cannot work. Returns whether it did.

    Call it before loading the model, so the model and the card are still written to `output_dir`.
    """
    if not training_args.push_to_hub:
        return False
    reason = push_unavailable_reason(getattr(training_args, "hub_token", None))
    if reason is None:
        return False
    logger.warning(
        "Skipping --push_to_hub: %s; the model and its model card are saved to %s only.",
        reason,
        training_args.output_dir,
    )
    training_args.push_to_hub = False
    return True
